"""The Dask side of the cluster-wide in-flight budget: a scheduler plugin that runs the
``coordinator.Coordinator`` behind the ``nemocc_budget`` handler, and each pool's line to it.
"""

from __future__ import annotations

import asyncio
import time
import uuid

from distributed.diagnostics.plugin import SchedulerPlugin

from nemocc_dask.llm.coordinator import Coordinator, budget_setting

PLUGIN_NAME = "nemocc-budget"
HANDLER = "nemocc_budget"


class BudgetPlugin(SchedulerPlugin):
    """Serves the ``nemocc_budget`` handler on the scheduler."""

    name = PLUGIN_NAME

    def __init__(self):
        self.coordinator = Coordinator()

    async def start(self, scheduler) -> None:
        scheduler.handlers[HANDLER] = self.handle

    def handle(self, holder: str, worker: str, endpoints: dict) -> dict:
        return self.coordinator.report(holder, worker, endpoints, time.monotonic())


def endpoint_statuses(dask_scheduler=None) -> dict[str, list[dict]]:
    """Run on the scheduler (``client.run_on_scheduler``): every pool's latest endpoint status."""
    plugin = (dask_scheduler.plugins.get(PLUGIN_NAME) if dask_scheduler is not None else None)
    return plugin.coordinator.statuses() if plugin is not None else {}


class BudgetLink:
    """A pool's line to the scheduler's coordinator, from any event loop of the worker process."""

    def __init__(self, worker):
        self._worker = worker
        self.holder = f"{worker.address}/{uuid.uuid4().hex[:8]}"
        self.report_seconds = budget_setting("report-seconds")
        self.idle_report_seconds = budget_setting("idle-report-seconds")
        self._registered = False

    def on_worker_loop(self) -> bool:
        """Whether the caller runs on the worker's event loop (which ``exchange`` needs free)."""
        try:
            return asyncio.get_running_loop() is self._worker.loop.asyncio_loop
        except RuntimeError:
            return False

    async def exchange(self, reports: dict[str, dict]) -> dict:
        """Send this holder's per-endpoint report; returns the coordinator's answer."""
        future = asyncio.run_coroutine_threadsafe(self._exchange(reports),
                                                  self._worker.loop.asyncio_loop)
        return await asyncio.wrap_future(future)

    async def _exchange(self, reports: dict[str, dict]) -> dict:
        scheduler = self._worker.scheduler
        if not self._registered:
            from distributed.protocol.pickle import dumps

            await scheduler.register_scheduler_plugin(plugin=dumps(BudgetPlugin()),
                                                      name=PLUGIN_NAME, idempotent=True)
            self._registered = True
        answer = await scheduler.nemocc_budget(holder=self.holder, worker=self._worker.address,
                                               endpoints=reports)
        if not isinstance(answer, dict) or "endpoints" not in answer:
            raise RuntimeError(f"the scheduler's {HANDLER} handler answered {answer!r}")
        return answer
