"""The cluster-wide in-flight budget: per endpoint, the requests in flight on all workers together
stay within ``max_in_flight`` while workers join, leave, idle and get busy.

A scheduler plugin (``BudgetPlugin``) keeps an ``Allocator``. Each worker's pool reports about every
``REPORT_SECONDS`` while it has work, per endpoint: its cap (the most it may have in flight now),
how many requests it has in flight and how many want a slot (its demand). The answer is its new
cap: a max-min fair share of the budget by demand (nobody gets more than it wants, the rest is split
evenly; a holder's demand is its peak over the last second, so that the dip between two partitions
does not hand its room away and back). Room another worker may still be using is never handed out: a holder counts as the largest
of its reported cap, its in-flight count and its last grant until it reports again. Shrinking is
therefore immediate (the worker stops dispatching) and growing waits until the room is free, so the
caps never add up to more than the budget.

Tolerance: every busy holder gets at least one slot, so with more busy holders than the budget the
sum can exceed it by (busy holders - budget). A holder that stops reporting for ``STALE_SECONDS``
gives its room back; one whose worker leaves the cluster gives it back ``DEPARTED_SECONDS`` later
(a retired worker's running task, and its requests, outlive its removal by the scheduler for a
moment: handing their room out at once let the others exceed the budget).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass

from distributed.diagnostics.plugin import SchedulerPlugin

PLUGIN_NAME = "nemocc-budget"
HANDLER = "nemocc_budget"
REPORT_SECONDS = 0.1
DEMAND_MEMORY_SECONDS = 1.0  # a holder's demand counts as its peak over this long
IDLE_REPORT_SECONDS = 2.0
STALE_SECONDS = 10.0
DEPARTED_SECONDS = 5.0


@dataclass
class Holding:
    """What one holder (a worker's pool) last reported for one endpoint, and its grant."""

    worker: str
    total: int
    cap: int = 0
    in_flight: int = 0
    demand: int = 0
    granted: int = 0
    seen: float = 0.0
    peak_demand: int = 0
    peak_at: float = 0.0
    status: dict | None = None  # the pool's view of the endpoint, for the progress line
    departed: float | None = None  # when its worker left the cluster

    def expired(self, now: float) -> bool:
        """Whether its room is free again: silent too long, or its worker gone long enough."""
        return (now - self.seen > STALE_SECONDS
                or (self.departed is not None and now - self.departed > DEPARTED_SECONDS))

    def remember_demand(self, demand: int, now: float) -> None:
        """Keep the peak demand of the last DEMAND_MEMORY_SECONDS, so that the short dips
        between two partitions do not hand the holder's room to others and back."""
        self.demand = demand
        if demand >= self.peak_demand or now - self.peak_at > DEMAND_MEMORY_SECONDS:
            self.peak_demand, self.peak_at = demand, now

    @property
    def held(self) -> int:
        """The most this holder may have in flight until it reports again."""
        return max(self.cap, self.in_flight, self.granted)


def fair_shares(demands: dict[str, int], total: int) -> dict[str, int]:
    """Max-min fair integer shares of ``total`` by demand; every positive demand gets at least 1
    (the documented tolerance when there are more demands than ``total``)."""
    shares = {key: 0 for key in demands}
    active = sorted(key for key, demand in demands.items() if demand > 0)
    left = total
    while active and left > 0:
        each, extra = divmod(left, len(active))
        if each == 0:
            for key in active[:left]:
                shares[key] += 1
            break
        unsatisfied = []
        for i, key in enumerate(active):
            give = min(demands[key] - shares[key], each + (i < extra))
            shares[key] += give
            left -= give
            if shares[key] < demands[key]:
                unsatisfied.append(key)
        active = unsatisfied
    for key, demand in demands.items():
        if demand > 0 and shares[key] == 0:
            shares[key] = 1
    return shares


class Allocator:
    """Per-endpoint holdings and grants (pure logic, driven by reports; no clock of its own)."""

    def __init__(self):
        self.endpoints: dict[str, dict[str, Holding]] = {}

    def report(self, endpoint: str, holder: str, worker: str, total: int, cap: int,
               in_flight: int, demand: int, now: float, status: dict | None = None) -> int:
        """Record one holder's report for ``endpoint``; returns its new cap."""
        holdings = self.endpoints.setdefault(endpoint, {})
        for key in [k for k, h in holdings.items() if h.expired(now)]:
            del holdings[key]
        mine = holdings.setdefault(holder, Holding(worker=worker, total=total))
        mine.total, mine.cap, mine.in_flight, mine.seen = total, cap, in_flight, now
        mine.status = status
        mine.remember_demand(demand, now)
        budget = min(h.total for h in holdings.values())
        target = fair_shares({k: h.peak_demand for k, h in holdings.items()}, budget)[holder]
        room = budget - sum(h.held for k, h in holdings.items() if k != holder)
        mine.granted = max(0, min(target, room)) if target > 0 else 0
        if not (mine.granted or mine.cap or mine.in_flight or mine.peak_demand):
            del holdings[holder]
        return mine.granted

    def forget_worker(self, worker: str, now: float) -> None:
        """Give back the room of every holder on ``worker`` (it left the cluster at ``now``)
        once DEPARTED_SECONDS have passed."""
        for holdings in self.endpoints.values():
            for holding in holdings.values():
                if holding.worker == worker and holding.departed is None:
                    holding.departed = now

    def statuses(self) -> dict[str, list[dict]]:
        """Per endpoint, the latest status of each holder (see ``Endpoint.status``)."""
        return {name: [h.status for h in holdings.values() if h.status]
                for name, holdings in self.endpoints.items()}

    def in_use(self, endpoint: str) -> int:
        """The sum of what the holders of ``endpoint`` may have in flight."""
        return sum(h.held for h in self.endpoints.get(endpoint, {}).values())


class BudgetPlugin(SchedulerPlugin):
    """Serves the ``nemocc_budget`` handler on the scheduler and forgets workers that leave."""

    name = PLUGIN_NAME

    def __init__(self):
        self.allocator = Allocator()

    async def start(self, scheduler) -> None:
        scheduler.handlers[HANDLER] = self.handle

    def handle(self, holder: str, worker: str, total: int, endpoints: dict) -> dict[str, int]:
        now = time.monotonic()
        return {name: self.allocator.report(name, holder, worker, total, now=now, **counts)
                for name, counts in endpoints.items()}

    def remove_worker(self, scheduler, worker: str, **kwargs) -> None:
        self.allocator.forget_worker(worker, time.monotonic())


def endpoint_statuses(dask_scheduler=None) -> dict[str, list[dict]]:
    """Run on the scheduler (``client.run_on_scheduler``): every pool's latest endpoint status."""
    plugin = (dask_scheduler.plugins.get(PLUGIN_NAME) if dask_scheduler is not None else None)
    return plugin.allocator.statuses() if plugin is not None else {}


class BudgetLink:
    """A pool's line to the scheduler's allocator, from any event loop of the worker process."""

    def __init__(self, worker, total: int):
        self._worker = worker
        self.total = total
        self.holder = f"{worker.address}/{uuid.uuid4().hex[:8]}"
        self._registered = False

    def on_worker_loop(self) -> bool:
        """Whether the caller runs on the worker's event loop (which ``exchange`` needs free)."""
        try:
            return asyncio.get_running_loop() is self._worker.loop.asyncio_loop
        except RuntimeError:
            return False

    async def exchange(self, reports: dict[str, dict]) -> dict[str, int]:
        """Send this holder's per-endpoint counts; returns the new cap per endpoint."""
        future = asyncio.run_coroutine_threadsafe(self._exchange(reports),
                                                  self._worker.loop.asyncio_loop)
        return await asyncio.wrap_future(future)

    async def _exchange(self, reports: dict[str, dict]) -> dict[str, int]:
        scheduler = self._worker.scheduler
        if not self._registered:
            from distributed.protocol.pickle import dumps

            await scheduler.register_scheduler_plugin(plugin=dumps(BudgetPlugin()),
                                                      name=PLUGIN_NAME, idempotent=True)
            self._registered = True
        grants = await scheduler.nemocc_budget(holder=self.holder, worker=self._worker.address,
                                               total=self.total, endpoints=reports)
        if not isinstance(grants, dict):
            raise RuntimeError(f"the scheduler's {HANDLER} handler answered {grants!r}")
        return grants
