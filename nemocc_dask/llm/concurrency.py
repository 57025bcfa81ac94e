"""Self-tuning concurrency (``max_in_flight="auto"``): learn each endpoint's window.

The goal is the smallest window at which the server's throughput stops rising: a
continuous-batching server (vLLM, SGLang, TGI) gets faster per token with more sequences only up
to the number it decodes at once; past that, extra requests wait in its queue and only add latency.

Epochs: every window change starts an epoch. After a rise, its first ``window`` requests sent only
turn the server's load over to the new window (the queue still holds requests of the old one);
the next ``_needed(window)`` are its cohort (``sent`` tags them), and the decision waits
until the whole cohort is back (``on_answer`` / ``on_lost``). So an epoch lasts about two round
trips, growth is per round trip, not per answer, every decision sees the settled effect of the
previous one, and short answers (back first) do not bias it.

Signals, in order of preference:

* The server's queue (``on_metrics``: vLLM's ``num_requests_running`` / ``num_requests_waiting``
  from ``/metrics``). Requests waiting (more than ``QUEUE_FRACTION`` of those running, on
  ``QUEUED_POLLS`` polls in a row): shrink by our share of the queue. None waiting while the
  window is what limits us: grow (x2 per round trip until the first queue, then x1.1 after
  ``METRICS_HOLD_EPOCHS`` round trips without queue).
* Else latency per answer token (so that long answers do not look like a slow server), as the
  *elasticity* of latency to the window, e = dln(latency) / dln(window). Below the batching
  capacity more sequences cost little latency (e well under 1); past it latency rises in
  proportion (e = 1, pure queueing). Slow start doubles while e < ``GROW_BELOW``; then it jumps
  below the overshoot (Little's law, ``_leave_slow_start``) and steps down by ``DOWN_STEP``
  while each step down still shows e >= ``SATURATED``, and settles one step up from the first
  step down that gains nothing. Steady: probe +10% now and then (kept when e stays low). Capacity
  lost: latency per token ``FAST_DRIFT`` times the settled level over the last answers (or
  ``DRIFT`` times over an epoch) cuts the window at once, then sets it from the measured token
  throughput times the settled latency per token (Little's law), then steps down if needed.
* 429/503 halve the window (at most once per round trip).

The controller is pure (no I/O, no clock of its own): the pool feeds it and applies the window.
"""

from __future__ import annotations

import collections
import math
from dataclasses import dataclass

INITIAL_WINDOW = 8
GROW_BELOW = 0.6        # slow start continues while latency grows slower than this
SATURATED = 0.75        # elasticity at which the server is taken as queueing
DOWN_STEP = 0.8
PROBE_UP = 1.1
PROBE_EVERY = 4         # steady epochs between two probes up
DRIFT = 1.25            # latency per token this much above the reference at the same window
FAST_DRIFT = 1.5        # ... over the last answers of any epoch: capacity lost, act at once
METRICS_GROWTH = (2.0, 1.1)  # per round trip without queue: before / after the first queue
METRICS_HOLD_EPOCHS = 3      # epochs without queue after a cut before growing again
QUEUE_FRACTION = 0.05        # a queue is more than this fraction of the running requests (and 2)
QUEUED_POLLS = 2             # ... seen on this many polls in a row


@dataclass
class Change:
    """A window change and why (for the INFO log and the report)."""

    old: int
    new: int
    reason: str


@dataclass
class _Epoch:
    window: int
    skip: int = 0     # sends that only turn the server's load over to this window
    sent: int = 0
    back: int = 0     # cohort requests answered or lost
    answers: int = 0
    seconds: float = 0.0
    tokens: int = 0
    limited: bool = False  # some request of this epoch waited for a slot of this window

    def per_token(self) -> float:
        return self.seconds / max(1, self.tokens)


class WindowController:
    """The learned window of one endpoint (between 1 and ``ceiling``)."""

    def __init__(self, ceiling: int, initial: int = INITIAL_WINDOW):
        self.ceiling = max(1, ceiling)
        self.window = min(self.ceiling, initial)
        self.phase = "slow_start"
        self.epoch = 0
        self.uses_metrics = False
        self._current = _Epoch(self.window, skip=self.window)
        self._recent: collections.deque = collections.deque(maxlen=self._needed(self.window))
        self._previous: _Epoch | None = None  # the last finished epoch at another window
        self._reference: _Epoch | None = None  # steady: the settled window's latency
        self._steady_epochs = 0
        self._metrics_queued_once = False
        self._last_cut = float("-inf")
        self._queued_polls = 0

    # -- inputs -------------------------------------------------------------------------------
    def on_limited(self) -> None:
        """A request had to wait for a slot while the window (not the cap) was full."""
        self._current.limited = True

    def sent(self) -> int | None:
        """A request is sent: its tag (the epoch) if it belongs to the epoch's cohort."""
        current = self._current
        current.sent += 1
        if not current.skip < current.sent <= current.skip + self._needed(current.window):
            return None
        return self.epoch

    def on_answer(self, tag: int | None, seconds: float, tokens: int,
                  now: float | None = None) -> Change | None:
        """An answer to a request tagged ``tag`` took ``seconds`` for ``tokens`` tokens and
        arrived at ``now`` (monotonic seconds, for the throughput after a capacity loss)."""
        jump = self._watch_drift(seconds, tokens, now)
        if jump is not None:
            return jump
        if tag != self.epoch:
            return None
        current = self._current
        current.answers += 1
        current.seconds += seconds
        current.tokens += max(1, tokens)
        return self._back()

    def _watch_drift(self, seconds: float, tokens: int, now: float | None) -> Change | None:
        """Settled (latency signal): every answer, not only the cohort's, feeds the latency per
        token of the last few answers. ``FAST_DRIFT`` times the settled level means capacity was
        lost: cut by that factor at once, then (phase ``measuring``) set the window to the token
        throughput of the next answers times the settled latency per token (Little's law: what
        the server now serves at the settled latency)."""
        if self.uses_metrics or self._reference is None or self.phase not in (
                "steady", "probing", "measuring"):
            return None
        self._recent.append((now, seconds, max(1, tokens)))
        if len(self._recent) < self._recent.maxlen:
            return None
        reference = self._reference.per_token()
        if self.phase == "measuring":
            first, last = self._recent[0][0], self._recent[-1][0]
            throughput = sum(t for _, _, t in list(self._recent)[1:]) / max(1e-9, last - first)
            self.phase = "stepping_down"
            change = self._set(min(self.window, max(1, int(throughput * reference))),
                               f"capacity lost: the server now serves {throughput:.0f} "
                               "tokens/s")
            self._previous = None
            return change
        level = sum(s for _, s, _ in self._recent) / sum(t for _, _, t in self._recent)
        if level <= FAST_DRIFT * reference:
            return None
        change = self._jump_down(self._current, level / reference)
        if now is not None:
            self.phase = "measuring"
        return change

    def on_lost(self, tag: int | None) -> Change | None:
        """A request tagged ``tag`` ended without an answer (error, retry, cancelled)."""
        if tag != self.epoch:
            return None
        return self._back()

    def _back(self) -> Change | None:
        current = self._current
        current.back += 1
        if current.back < self._needed(current.window):
            return None
        if not current.answers:
            return self._restart_epoch()
        if self.uses_metrics:
            return self._metrics_epoch_done()
        return self._latency_epoch_done()

    def on_overload(self, now: float, round_trip: float) -> Change | None:
        """A 429/503 at ``now``: halve, at most once per ``round_trip`` seconds (the answers to
        requests sent before the cut say nothing about the new window)."""
        if self.phase == "backed_off" and now - self._last_cut < round_trip:
            return None
        self.phase = "backed_off"
        self._last_cut = now
        return self._set(max(1, self.window // 2), "the server answered 429/503")

    def on_metrics(self, running: int, waiting: int, own_in_flight: int) -> Change | None:
        """The server's queue (from its /metrics): shrink by our share of what waits."""
        self.uses_metrics = True
        if waiting <= max(2, QUEUE_FRACTION * running):
            self._queued_polls = 0
            return None
        self._queued_polls += 1
        if self._queued_polls < QUEUED_POLLS:  # a request between two scheduler steps
            return None
        self._metrics_queued_once = True
        if self._current.answers == 0 and self.phase == "queue":
            return None  # the last cut has not shown its effect yet
        share = own_in_flight / max(1, running + waiting)
        self.phase = "queue"
        self._steady_epochs = 0
        return self._set(max(1, self.window - math.ceil(waiting * share)),
                         f"{waiting} requests wait in the server's queue")

    # -- decisions ----------------------------------------------------------------------------
    @staticmethod
    def _needed(window: int) -> int:
        return max(4, min(64, window // 2))

    def _metrics_epoch_done(self) -> Change | None:
        if not self._current.limited:
            return self._restart_epoch()
        if self._metrics_queued_once and self._steady_epochs < METRICS_HOLD_EPOCHS:
            self._steady_epochs += 1  # hold a little after a cut before trying more again
            return self._restart_epoch()
        growth = METRICS_GROWTH[1] if self._metrics_queued_once else METRICS_GROWTH[0]
        self.phase = "probing" if self._metrics_queued_once else "slow_start"
        return self._set(max(self.window + 1, int(self.window * growth)),
                         "no queue at the server")

    def _latency_epoch_done(self) -> Change | None:
        current, previous = self._current, self._previous
        e = self._elasticity(previous, current)
        if self.phase in ("slow_start", "backed_off"):
            if not current.limited:
                return self._restart_epoch()
            if e is None or e < GROW_BELOW:
                return self._set(min(self.ceiling, self.window * 2),
                                 "latency per token barely rises", keep=current)
            return self._leave_slow_start(previous, current, e)
        if self.phase == "stepping_down":
            drift = self._drift(current)
            if drift > DRIFT:
                return self._jump_down(current, drift)
            if e is not None and e >= SATURATED:
                return self._step_down(current, f"still queueing one step down (e={e:.2f})")
            if e is not None and e < 0:  # slower at a smaller window: the server lost capacity
                return self._step_down(current, f"latency rose as the window fell (e={e:.2f})")
            if e is not None and previous is not None:  # the window one step up did not queue
                return self._settle(previous, back_to=previous.window,
                                    reason=f"one step down gains nothing (e={e:.2f})")
            return self._settle(current)
        if self.phase == "probing":
            if e is not None and e >= SATURATED and previous is not None:
                return self._settle(previous, back_to=previous.window,
                                    reason=f"probe up only queued (e={e:.2f})")
            return self._settle(current)
        return self._steady_epoch_done(current)

    def _steady_epoch_done(self, current: _Epoch) -> Change | None:
        drift = self._drift(current)
        if drift > DRIFT:
            return self._jump_down(current, drift)
        self._steady_epochs += 1
        if current.limited and self._steady_epochs >= PROBE_EVERY and self.window < self.ceiling:
            self.phase = "probing"
            return self._set(min(self.ceiling, max(self.window + 1,
                                                   int(self.window * PROBE_UP))),
                             "probing for more throughput", keep=current)
        if self._reference is None or self._steady_epochs % PROBE_EVERY == 0:
            self._reference = current
        return self._restart_epoch()

    def _drift(self, current: _Epoch) -> float:
        """Latency per token now over the settled window's (1 without a reference)."""
        if self._reference is None:
            return 1.0
        return current.per_token() / self._reference.per_token()

    def _jump_down(self, current: _Epoch, drift: float) -> Change | None:
        """Capacity lost: divide the window by ``drift`` (latency now over the settled level, or
        the window over what the measured throughput needs); then step down if still queueing."""
        self.phase = "stepping_down"
        change = self._set(max(1, int(current.window / drift)),
                           f"latency per token rose {drift:.1f}x above the settled level")
        self._previous = None  # no step to compare with: the next epoch settles or steps down
        return change

    def _leave_slow_start(self, below: _Epoch, above: _Epoch, e: float) -> Change | None:
        """The knee lies between ``below`` and ``above``. Throughput at ``above`` is
        ``window / latency per token``; at ``below``'s latency that throughput needs
        ``above.window * r_below / r_above`` (a lower bound of the knee, as latency rises below
        it too). Start stepping down from the geometric mean of that bound and ``above``."""
        ratio = below.per_token() / above.per_token()
        start = max(below.window, int(above.window * math.sqrt(min(1.0, ratio))))
        self.phase = "stepping_down"
        return self._set(start, f"latency rises with the window (e={e:.2f})", keep=above)

    def _step_down(self, current: _Epoch, reason: str) -> Change | None:
        self.phase = "stepping_down"
        return self._set(max(1, int(current.window * DOWN_STEP)), reason, keep=current)

    def _settle(self, reference: _Epoch, back_to: int | None = None,
                reason: str = "settled") -> Change | None:
        """Hold a window (``back_to``, else the current one) whose latency is ``reference``'s."""
        self.phase = "steady"
        self._steady_epochs = 0
        self._reference = reference
        if back_to is not None:
            return self._set(back_to, reason)
        return self._restart_epoch()

    @staticmethod
    def _elasticity(before: _Epoch | None, after: _Epoch) -> float | None:
        if before is None or before.window == after.window or not before.tokens:
            return None
        return (math.log(after.per_token() / before.per_token())
                / math.log(after.window / before.window))

    # -- bookkeeping --------------------------------------------------------------------------
    def _restart_epoch(self) -> None:
        """Measure the same window again (a new epoch, no change)."""
        self.epoch += 1
        self._current = _Epoch(self.window)
        return None

    def _set(self, window: int, reason: str, keep: _Epoch | None = None) -> Change | None:
        window = max(1, min(self.ceiling, int(window)))
        if keep is not None:
            self._previous = keep
        elif self._current.answers:
            self._previous = self._current
        old, self.window = self.window, window
        self.epoch += 1
        # after a rise the first sends join a queue still shaped by the old window; after a cut
        # nothing is sent until in flight is under the new window, so no turnover is needed
        self._current = _Epoch(window, skip=window if window > old else 0)
        self._recent = collections.deque(maxlen=self._needed(window))
        return Change(old, window, reason) if window != old else None
