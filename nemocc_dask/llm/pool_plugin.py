"""The Dask side of a worker's client pools: the worker plugin that owns them, and which worker
this process is (kept apart from ``pools`` so that importing the package does not import
``distributed`` before its logging is configured)."""

from __future__ import annotations

from distributed import get_worker
from distributed.diagnostics.plugin import WorkerPlugin

from nemocc_dask.llm.pools import PLUGIN_NAME, close_pools


class PoolsPlugin(WorkerPlugin):
    """Owns a worker's client pools: they are closed when the worker closes."""

    name = PLUGIN_NAME

    def teardown(self, worker) -> None:
        close_pools()


def current_worker():
    """This process's Dask worker, or None outside one."""
    try:
        return get_worker()
    except ValueError:
        return None
