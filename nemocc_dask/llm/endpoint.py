"""One endpoint as a pool sees it: its client, the cap and lease its coordinator granted, what it
saw since its last report, and its health (cool-down, failure budget).

The pool dispatches to an endpoint only while ``has_slot``: not broken, not cooling down or paused
by a ``Retry-After``, within its lease, and with fewer requests in flight than its cap. A 429/503
halves the cap at once (once per grant) until the coordinator's next answer, which has cut the
window itself by then. Counters for the coordinator (requests sent, answers, lost, overloads per
epoch tag) are taken and reset by ``take_report``.
"""

from __future__ import annotations

import collections
import time
from typing import Any

from nemocc_dask.config import setting
from nemocc_dask.llm.concurrency import Tally
from nemocc_dask.llm.telemetry import EndpointSeries
from nemocc_dask.llm.timeouts import AdaptiveTimeout


class Endpoint:
    """One endpoint's client, granted cap, lease, report counters and health."""

    def __init__(self, name: str, client: Any, ceiling: int, auto: bool,
                 timeout: AdaptiveTimeout | None = None):
        self.name = name
        self.client = client
        self.timeout = timeout  # the automatic request timeout, if the config asks for one
        self.ceiling = ceiling
        self.auto = auto
        self.cap = 0
        self.window = 0          # the endpoint's window, as the coordinator last said
        self.epoch = -1          # the tag requests are sent with
        self.lease_until = 0.0
        self.poll = False        # this pool reads the server's queue gauges for everyone
        self.poll_url: str | None = None  # its /metrics, where the server may have one
        self.overload_clamped = False
        self.series = EndpointSeries()
        self.answers = 0
        self.unloaded: float | None = None  # the lowest latency per token seen
        self.per_token: float | None = None  # latency per token, moving average
        self.queue: tuple[int, int] | None = None  # the server's (running, waiting), if known
        self.queue_fresh = False  # read since the last report
        self.metrics_failed = False
        self.in_flight = 0
        self.consecutive_connection_failures = 0
        self.cooldown_until = 0.0
        self.finished_ok = 0
        self.finished_failed = 0
        self.example_failure: str | None = None
        self.broken = False
        self._sent: collections.Counter = collections.Counter()
        self._lost: collections.Counter = collections.Counter()
        self._tallies: dict[int, Tally] = {}
        self._overloads = 0

    def status(self) -> dict:
        """What the progress line shows about this endpoint (sent with reports)."""
        return {"window": self.window, "in_flight": self.in_flight, "answers": self.answers,
                "errors": self.finished_failed, "per_token": self.per_token,
                "unloaded": self.unloaded,
                "waiting": self.queue[1] if self.queue else None,
                "paused": self.cooldown_until > time.monotonic()}

    def has_slot(self, now: float) -> bool:
        return (not self.broken and now >= self.cooldown_until and now < self.lease_until
                and self.in_flight < self.cap)

    # -- coordinator ---------------------------------------------------------------------------
    def take_report(self, waiting: int, closing: bool = False) -> dict:
        """This endpoint's report since the last one (the counters start again)."""
        fenced = closing or time.monotonic() >= self.lease_until  # may send nothing new
        report = {"total": self.ceiling, "auto": self.auto,
                  "cap": 0 if fenced else self.cap, "in_flight": self.in_flight,
                  "demand": 0 if closing else self.in_flight + waiting,
                  "status": self.status(), "can_poll": self.poll_url is not None,
                  "sent": dict(self._sent), "lost": dict(self._lost),
                  "answers": {tag: t.as_list() for tag, t in self._tallies.items()},
                  "overloads": self._overloads, "metrics_failed": self.metrics_failed}
        if self.poll and self.queue_fresh:
            report["queue"] = list(self.queue)
            self.queue_fresh = False
        self._sent.clear()
        self._lost.clear()
        self._tallies = {}
        self._overloads = 0
        return report

    def apply_grant(self, grant: dict, lease_until: float) -> None:
        """The coordinator's answer: cap, epoch tag, window, poller role, lease."""
        self.cap = int(grant.get("cap", 0))
        self.epoch = int(grant.get("epoch", self.epoch))
        self.window = int(grant.get("window", self.window))
        self.poll = bool(grant.get("poll")) and self.poll_url is not None
        self.lease_until = lease_until
        self.overload_clamped = False

    # -- one request ---------------------------------------------------------------------------
    def sent(self) -> int:
        """A request goes out: its epoch tag."""
        self._sent[self.epoch] += 1
        return self.epoch

    def on_success(self, tag: int, latency: float, tokens: int) -> None:
        """Count an answer for the coordinator and the progress line."""
        self.consecutive_connection_failures = 0
        self.answers += 1
        self._tallies.setdefault(tag, Tally()).add(latency, tokens)
        if self.timeout is not None:
            self.timeout.on_answer(latency, tokens)
        per_token = latency / max(1, tokens)
        self.unloaded = per_token if self.unloaded is None else min(self.unloaded, per_token)
        self.per_token = per_token if self.per_token is None else (
            0.9 * self.per_token + 0.1 * per_token)
        self.series.answer(latency, tokens, self.window)

    def on_lost(self, tag: int, overload: bool) -> None:
        """A request ended without an answer; ``overload``: a 429/503 or a timeout, which
        halves the cap at once (once until the coordinator answers again)."""
        self._lost[tag] += 1
        self.series.error(self.window)
        if overload:
            self._overloads += 1
            if not self.overload_clamped:
                self.overload_clamped = True
                self.cap = max(1, min(self.cap, self.in_flight) // 2)

    def on_connection_failure(self, now: float, cooldown: float) -> bool:
        """Count a failed connection; True when the endpoint goes into cool-down."""
        self.consecutive_connection_failures += 1
        limit = setting("endpoint.connection-failures-before-cooldown")
        if self.consecutive_connection_failures >= limit:
            self.cooldown_until = now + cooldown
            self.consecutive_connection_failures = 0
            return True
        return False

    # -- failure budget ------------------------------------------------------------------------
    def count_outcome(self, failure: str | None, max_failed_fraction: float,
                      min_requests: int) -> bool:
        """Count a finished request (``failure`` is its error, None if answered); True when this
        makes the endpoint broken (its failures exceed the budget)."""
        if failure is None:
            self.finished_ok += 1
            return False
        self.finished_failed += 1
        self.example_failure = self.example_failure or failure
        finished = self.finished_ok + self.finished_failed
        if (not self.broken and finished >= min_requests
                and self.finished_failed / finished > max_failed_fraction):
            self.broken = True
            return True
        return False

    def describe_failures(self) -> str:
        return (f"{self.name}: {self.finished_failed} of "
                f"{self.finished_ok + self.finished_failed} requests failed, e.g. "
                f"{self.example_failure}")
