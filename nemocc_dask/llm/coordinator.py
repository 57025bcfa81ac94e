"""Each endpoint's concurrency for the whole cluster: one learned window, divided among the pools
that send to it, by leases that fence (pure logic: no Dask, no I/O; ``budget`` runs it on the Dask
scheduler).

A ``Coordinator`` keeps, per endpoint, one window controller (``concurrency.WindowController`` for
``max_in_flight="auto"``, else ``FixedWindow``) and the holders (pools) sending to it. It runs in a
scheduler plugin (``budget.BudgetPlugin``) for a Dask cluster, or inside a pool that has no
scheduler (``LocalLink``). Every holder reports about every ``nemocc.budget.report-seconds`` while
it has work: per endpoint its cap, requests in flight and waiting (its demand), and what happened
since its last report (requests sent, the answers' ``Tally`` and requests lost per epoch tag,
429/503s and timeouts, the server's queue gauges if it is the endpoint's poller). The controller
learns from the merged reports of all holders; its window is the budget. The answer to a report is,
per endpoint, the holder's new cap, the epoch tag to put on requests, whether to poll the server's
``/metrics``, and a lease.

Grants: a max-min fair share of the budget by demand (a holder's demand is its peak over the last
``DEMAND_MEMORY_SECONDS``, so the dip between two partitions does not hand its room away and back).
With more busy holders than the budget, who gets the odd slots rotates every few round trips, so
nobody starves. Room another holder may still use is never handed out: a holder counts as the
largest of its reported cap, its in-flight count and its last grant until it reports again, so
the caps never add up to more than the budget. Shares are recomputed at most every
``TICK_SECONDS``; a report costs O(1) (the scheduler stays cheap with a thousand holders).

Leases: a grant is valid for ``nemocc.budget.lease-seconds`` from the moment the holder *sent* the
report that got it. A holder whose lease lapses (no answer from the scheduler: a stalled process,
a blocked event loop, a hung RPC) stops dispatching until it is renewed. The scheduler hands out a
silent holder's room only ``lease + nemocc.budget.lease-grace-seconds`` after it *received* that
report, when the holder's own lease has certainly expired too; a holder that reports after that is
logged as a warning and starts over with what is free.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

from nemocc_dask.config import setting
from nemocc_dask.llm.concurrency import Change, FixedWindow, Tally, WindowController

DEMAND_MEMORY_SECONDS = 1.0  # a holder's demand counts as its peak over this long
TICK_SECONDS = 0.1           # shares and expiries are recomputed at most this often
ROTATE_ROUND_TRIPS = 4       # with more busy holders than slots, who gets one rotates this often
MAX_REPORTS_PER_SECOND = 1000  # holders are told to report less often beyond this

logger = logging.getLogger(__name__)


def budget_setting(name: str) -> float:
    """A ``nemocc.budget.*`` setting from Dask config (seconds)."""
    return float(setting(f"budget.{name}"))


@dataclass
class Holding:
    """What one holder (a worker's pool) last reported for one endpoint, and its grant."""

    worker: str
    cap: int = 0
    in_flight: int = 0
    granted: int = 0
    seen: float = 0.0
    peak_demand: int = 0
    peak_at: float = 0.0
    status: dict | None = None  # the pool's view of the endpoint, for the progress line

    def remember_demand(self, demand: int, now: float) -> None:
        """Keep the peak demand of the last DEMAND_MEMORY_SECONDS."""
        if demand >= self.peak_demand or now - self.peak_at > DEMAND_MEMORY_SECONDS:
            self.peak_demand, self.peak_at = demand, now

    @property
    def held(self) -> int:
        """The most this holder may have in flight until it reports again."""
        return max(self.cap, self.in_flight, self.granted)


def fair_shares(demands: dict[str, int], total: int, rotation: int = 0) -> dict[str, int]:
    """Max-min fair integer shares of ``total`` by demand (never more in all than ``total``).
    Slots that cannot be split evenly go to the holders ``rotation`` places along the sorted
    order, so that a changing ``rotation`` lets every holder have its turn."""
    shares = {key: 0 for key in demands}
    active = sorted(key for key, demand in demands.items() if demand > 0)
    if active:
        start = rotation % len(active)
        active = active[start:] + active[:start]
    left = total
    while active and left > 0:
        each, extra = divmod(left, len(active))
        unsatisfied = []
        for i, key in enumerate(active):
            give = min(demands[key] - shares[key], each + (i < extra))
            shares[key] += give
            left -= give
            if shares[key] < demands[key]:
                unsatisfied.append(key)
        if each == 0:
            break
        active = unsatisfied
    return shares


class EndpointBudget:
    """One endpoint: its controller, its holders and their shares."""

    def __init__(self, name: str, ceiling: int, auto: bool):
        self.name = name
        self.controller = WindowController(ceiling) if auto else FixedWindow(ceiling)
        self.holdings: dict[str, Holding] = {}
        self.held_total = 0
        self.targets: dict[str, int] = {}
        self.poller: str | None = None
        self.metrics_failed = False
        self._tick_at = float("-inf")
        self._rotation = 0
        self._rotated_at = 0.0

    def limit_to(self, total: int) -> None:
        """Holders with different ``max_in_flight`` for one endpoint share the smallest."""
        ctl = self.controller
        if total < ctl.ceiling:
            ctl.ceiling = max(1, total)
            ctl.window = min(ctl.window, ctl.ceiling)

    def update(self, holder: str, holding: Holding, **fields) -> None:
        """Set fields of ``holder``'s ``holding`` (added if new), keeping ``held_total`` in
        step."""
        if self.holdings.get(holder) is holding:
            self.held_total -= holding.held
        for key, value in fields.items():
            setattr(holding, key, value)
        self.holdings[holder] = holding
        self.held_total += holding.held

    def remove(self, holder: str) -> None:
        holding = self.holdings.pop(holder, None)
        if holding is not None:
            self.held_total -= holding.held

    def feed(self, holder: str, report: dict, now: float) -> list[Change | None]:
        """Pass what ``holder`` saw since its last report to the controller."""
        ctl = self.controller
        changes: list[Change | None] = []
        for tag, count in report.get("sent", {}).items():
            ctl.on_sent(int(tag), count)
        for tag, values in report.get("answers", {}).items():
            changes.append(ctl.on_tally(int(tag), Tally.from_list(values)))
        for tag, count in report.get("lost", {}).items():
            changes.append(ctl.on_lost(int(tag), count))
        if report.get("overloads"):
            changes.append(ctl.on_overload(now))
        if report.get("metrics_failed"):
            self.metrics_failed = True
            ctl.uses_metrics = False
        queue = report.get("queue")
        if queue is not None and holder == self.poller and not self.metrics_failed:
            in_flight = sum(h.in_flight for h in self.holdings.values())
            changes.append(ctl.on_queue(queue[0], queue[1], in_flight))
        return changes

    def tick(self, now: float, stale_after: float, force: bool = False) -> list[str]:
        """At most every TICK_SECONDS (or when ``force``d): drop holders silent past their lease
        (returned), tell the controller the cluster's load, recompute the shares."""
        if not force and now - self._tick_at < TICK_SECONDS:
            return []
        self._tick_at = now
        expired = [k for k, h in self.holdings.items() if now - h.seen > stale_after]
        for key in expired:
            self.remove(key)
        demand = sum(h.peak_demand for h in self.holdings.values())
        in_flight = sum(h.in_flight for h in self.holdings.values())
        self.controller.on_load(demand, in_flight)
        if now - self._rotated_at > ROTATE_ROUND_TRIPS * self.controller.round_trip:
            self._rotation, self._rotated_at = self._rotation + 1, now
        self.targets = fair_shares({k: h.peak_demand for k, h in self.holdings.items()},
                                   self.controller.window, self._rotation)
        return expired

    def grant(self, holder: str) -> int:
        """``holder``'s new cap: its share, within the room nobody else may be using."""
        holding = self.holdings[holder]
        room = self.controller.window - (self.held_total - holding.held)
        granted = max(0, min(self.targets.get(holder, 0), room))
        self.update(holder, holding, granted=granted)
        if not (granted or holding.cap or holding.in_flight or holding.peak_demand):
            self.remove(holder)
        return granted


class Coordinator:
    """Per-endpoint windows and grants for every holder (pure logic; ``now`` comes in)."""

    def __init__(self, lease: float | None = None, grace: float | None = None,
                 report_seconds: float | None = None):
        self.lease = budget_setting("lease-seconds") if lease is None else lease
        self.grace = budget_setting("lease-grace-seconds") if grace is None else grace
        self.report_seconds = (budget_setting("report-seconds") if report_seconds is None
                               else report_seconds)
        self.endpoints: dict[str, EndpointBudget] = {}
        self.expired: dict[str, float] = {}  # holder -> when its room was handed out

    def report(self, holder: str, worker: str, endpoints: dict[str, dict],
               now: float) -> dict:
        """Record one holder's report; returns its caps, epoch tags, poll flags, lease, and how
        often to report (less often than ``report_seconds`` once the holders together would
        report more than ``MAX_REPORTS_PER_SECOND`` times a second)."""
        grants, holders = {}, 0
        for name, report in endpoints.items():
            budget = self.endpoints.get(name)
            if budget is None:
                budget = self.endpoints[name] = EndpointBudget(name, report["total"],
                                                               report.get("auto", False))
            budget.limit_to(int(report["total"]))
            grants[name] = self._report_one(budget, holder, worker, report, now)
            holders = max(holders, len(budget.holdings))
        return {"endpoints": grants, "lease": self.lease,
                "report_seconds": max(self.report_seconds, holders / MAX_REPORTS_PER_SECOND)}

    def _report_one(self, budget: EndpointBudget, holder: str, worker: str, report: dict,
                    now: float) -> dict:
        holding = budget.holdings.get(holder)
        if holding is None:
            holding = Holding(worker=worker)
            late = self.expired.pop(holder, None)
            if late is not None:
                logger.warning(
                    "endpoint %s: %s reported again %.1f s after its lease (%.0f s) expired "
                    "and its room was handed to others (a stalled process or event loop?); "
                    "fenced, it sent nothing new meanwhile and starts again with what is free",
                    budget.name, holder, now - late, self.lease)
        budget.update(holder, holding, cap=int(report.get("cap", 0)),
                      in_flight=int(report.get("in_flight", 0)), seen=now,
                      status=report.get("status"))
        idle_until_now = holding.peak_demand == 0
        holding.remember_demand(int(report.get("demand", 0)), now)
        if budget.poller not in budget.holdings and report.get("can_poll"):
            budget.poller = holder
        changes = [c for c in budget.feed(holder, report, now) if c is not None]
        for change in changes:
            logger.info("endpoint %s: window %d -> %d (%s)", budget.name, change.old,
                        change.new, change.reason)
        # a holder that had no demand has no share yet: recompute now, not at the next tick
        starting = idle_until_now and holding.peak_demand > 0
        for key in budget.tick(now, self.lease + self.grace, force=bool(changes) or starting):
            self.expired[key] = now
        if len(self.expired) > 10_000:  # remembered for the warning only; keep the newest
            self.expired = dict(sorted(self.expired.items(), key=lambda kv: kv[1])[-1000:])
        cap = budget.grant(holder)
        return {"cap": cap, "epoch": budget.controller.epoch,
                "window": budget.controller.window,
                "poll": budget.poller == holder and not budget.metrics_failed}

    def statuses(self) -> dict[str, list[dict]]:
        """Per endpoint, the latest status of each holder, with the endpoint's window."""
        return {name: [{**h.status, "window": b.controller.window, "shared": True}
                       for h in b.holdings.values() if h.status]
                for name, b in self.endpoints.items()}

    def in_use(self, endpoint: str) -> int:
        """The sum of what the holders of ``endpoint`` may have in flight."""
        budget = self.endpoints.get(endpoint)
        return budget.held_total if budget is not None else 0


class LocalLink:
    """A pool's own coordinator, where there is no scheduler (or each worker has a fixed
    share): the same logic in-process, no lease to lose."""

    report_seconds = 0.1
    idle_report_seconds = 2.0

    def __init__(self):
        self.holder = "local"
        self._coordinator = Coordinator(lease=math.inf, grace=0.0,
                                        report_seconds=self.report_seconds)

    def on_worker_loop(self) -> bool:
        return False

    async def exchange(self, reports: dict[str, dict]) -> dict:
        return self._coordinator.report(self.holder, "local", reports, time.monotonic())
