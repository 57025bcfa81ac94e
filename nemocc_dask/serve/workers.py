"""Serve the model on the cluster's own workers: start an inference server next to each worker
(or GPU, or node), feed it, and stop it.

``ServeSpec`` (``nemocc_dask.serve.process``) is a command template (``{host}``, ``{port}``,
``{gpu}``) or a backend's preset (``vllm:/models/llama``, ``sglang:...``, ``llamacpp:model.gguf``:
``nemocc_dask.serve.backends``).
``ServePlugin`` (a ``distributed`` worker plugin, so workers that join later get their servers
too) starts the server(s) of each worker, waits until they answer, watches them (the shared loop
of ``nemocc_dask.serve.supervision``: restart on exit or when they stop answering, at most
``max_restarts`` times) and stops them when the worker
closes or the run ends. With ``per="node"`` the workers of a node share one server
(``nemocc_dask.serve.node``). A worker's pool sends to its own servers (``local_urls``); the run's
``LLMConfig`` lists every server for the start-up check.

Verified here with CPU stand-ins (``nemocc-dask serve-mock`` and a llama.cpp server as the
command); vLLM and SGLang were not run.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import threading
import time
from pathlib import Path

from distributed.diagnostics.plugin import WorkerPlugin

from nemocc_dask.config import setting
from nemocc_dask.serve.node import NodeServer, meeting_folder
from nemocc_dask.serve.process import SERVE_LOGS, ServedProcess, ServeSpec
from nemocc_dask.serve.supervision import ServeError, supervise

__all__ = ["ServeError", "ServeSpec", "ServePlugin", "local_urls", "served_status", "serving"]

logger = logging.getLogger(__name__)

PLUGIN_NAME = "nemocc-serve"


def _gpus(spec: ServeSpec) -> list[str]:
    """The GPUs this worker serves on: all it sees, or (dask-cuda, which lists the worker's own
    GPU first) only its own."""
    visible = [g for g in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if g]
    if not visible:
        raise ServeError("--serve-per gpu, but CUDA_VISIBLE_DEVICES is empty on "
                         f"{socket.gethostname()}: no GPU to serve on")
    return visible[:1] if _is_dask_cuda() else visible


def _is_dask_cuda() -> bool:
    with contextlib.suppress(Exception):
        from distributed import get_worker

        return any("CPUAffinity" in type(p).__name__ or "RMM" in type(p).__name__
                   for p in get_worker().plugins.values())
    return False


class ServePlugin(WorkerPlugin):
    """The worker plugin that owns this worker's servers (or its share of the node's)."""

    name = PLUGIN_NAME

    def __init__(self, spec: ServeSpec):
        self.spec = spec
        self.servers: list[ServedProcess | NodeServer] = []
        self._supervisor: asyncio.Task | None = None

    async def setup(self, worker) -> None:
        from nemocc_dask.llm.pools import use_served_urls

        use_served_urls(local_urls)
        host = worker.address.split("://", 1)[-1].rsplit(":", 1)[0]
        logs = Path(self.spec.log_dir or os.path.join(os.getcwd(), SERVE_LOGS))
        try:
            if self.spec.per == "node":
                server = NodeServer(self.spec, host, meeting_folder(worker.scheduler.address,
                                                                    self.spec),
                                    logs / f"{socket.gethostname()}-node.log",
                                    f"{os.getpid()}-{worker.address}")
                self.servers.append(server)
                await server.join()
            else:
                gpus = _gpus(self.spec) if self.spec.per == "gpu" else [""]
                share = max(1, await _cpu_share(worker, host) // len(gpus))
                for gpu in gpus:
                    self.servers.append(ServedProcess(
                        self.spec, host, gpu,
                        logs / f"{socket.gethostname()}-{os.getpid()}-{gpu or 'cpu'}.log",
                        threads=share))
                    self.servers[-1].start()
                await asyncio.gather(*(s.wait_healthy() for s in self.servers))
        except BaseException:
            self.teardown(worker)
            raise
        self._supervisor = asyncio.ensure_future(supervise(self.servers))

    def teardown(self, worker) -> None:
        if self._supervisor is not None:
            self._supervisor.cancel()
        for server in self.servers:
            server.leave()

    def status(self) -> list[dict]:
        return [s.status() for s in self.servers]


async def _cpu_share(worker, host: str) -> int:
    """This worker's share of its host's cores (what a CPU server such as llama.cpp may use):
    the cores divided among the workers the scheduler knows on this host (one that joins later
    counts those already there)."""
    try:
        info = await worker.scheduler.identity()
        here = sum(1 for w in info.get("workers", {}).values() if w.get("host") == host)
    except Exception:  # noqa: BLE001 - an old scheduler: the whole host
        here = 1
    return max(1, (os.cpu_count() or 1) // max(1, here))


def _plugin_here():
    from distributed import get_worker

    with contextlib.suppress(ValueError):
        return get_worker().plugins.get(PLUGIN_NAME)
    return None


def local_urls() -> list[str]:
    """The URLs of the servers next to this worker (none outside a serving worker)."""
    plugin = _plugin_here()
    return [s.url for s in plugin.servers] if plugin is not None else []


def served_status(dask_worker=None) -> list[dict]:
    """This worker's servers (run on every worker by the driver)."""
    plugin = dask_worker.plugins.get(PLUGIN_NAME) if dask_worker is not None else None
    return plugin.status() if plugin is not None else []


@contextlib.contextmanager
def _still_waiting(spec: ServeSpec):
    """Log every ``nemocc.serve.waiting-log-seconds`` while the servers start (loading a model
    takes minutes)."""
    done = threading.Event()
    started = time.monotonic()

    def remind() -> None:
        while not done.wait(setting("serve.waiting-log-seconds")):
            logger.info("still waiting for the served model to answer %s (%.0f s of %g s; its "
                        "output is in %s)", spec.health, time.monotonic() - started,
                        spec.startup_timeout, spec.log_dir or SERVE_LOGS)

    thread = threading.Thread(target=remind, daemon=True, name="nemocc-serve-wait")
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


@contextlib.contextmanager
def serving(client, spec: ServeSpec):
    """Start ``spec``'s servers on every worker of ``client`` (and on workers that join later),
    yield a callable giving every server's status (a node's shared server once), and stop them
    all at the end."""
    logger.info("starting the served model (one per %s): %s", spec.per, spec.command)
    try:
        with _still_waiting(spec):
            client.register_plugin(ServePlugin(spec), name=PLUGIN_NAME)
    except BaseException:
        with contextlib.suppress(Exception):
            client.unregister_worker_plugin(PLUGIN_NAME)
        raise

    def status() -> list[dict]:
        by_url = {s["url"]: s for servers in client.run(served_status).values()
                  for s in servers}
        return [by_url[url] for url in sorted(by_url)]

    try:
        yield status
    finally:
        with contextlib.suppress(Exception):
            client.unregister_worker_plugin(PLUGIN_NAME)
