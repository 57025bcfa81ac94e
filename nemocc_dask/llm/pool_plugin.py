"""The Dask worker plugin that owns a worker's client pools (kept apart from ``pool`` so that
importing the package does not import ``distributed`` before its logging is configured)."""

from __future__ import annotations

from distributed.diagnostics.plugin import WorkerPlugin

from nemocc_dask.llm.pools import PLUGIN_NAME, close_pools


class PoolsPlugin(WorkerPlugin):
    """Owns a worker's client pools: they are closed when the worker closes."""

    name = PLUGIN_NAME

    def teardown(self, worker) -> None:
        close_pools()
