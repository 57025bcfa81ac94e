"""Serve the model on the cluster's own workers: start an inference server next to each worker,
feed it, and stop it.

``ServeSpec`` is a command template (``{host}``, ``{port}``, ``{gpu}``) or a preset
(``vllm:/models/llama``, ``sglang:...``, ``llamacpp:model.gguf``). ``ServePlugin`` (a
``distributed`` worker plugin, so workers that join later get their servers too) starts the
server(s) on each worker in their own process group with stdout/stderr in a log file, waits
until the health path answers, restarts a server that exits or stops answering (at most ``max_restarts`` times), and
kills the process group when the worker closes. A worker's pool sends to its own servers
(``local_urls``); the run's ``LLMConfig`` lists every server for the start-up check.

Nothing of vLLM/SGLang/llama.cpp is imported: they are processes. Verified here with CPU stand-ins
(``nemocc-dask serve-mock`` as the command); vLLM itself was not run.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from distributed.diagnostics.plugin import WorkerPlugin

from nemocc_dask.errors import StartError
from nemocc_dask.output_folder import SERVE_LOGS

logger = logging.getLogger(__name__)

PLUGIN_NAME = "nemocc-serve"
PRESETS = {  # name -> (command with {model}, health path)
    "vllm": ("vllm serve {model} --host {host} --port {port}", "/health"),
    "sglang": ("python -m sglang.launch_server --model-path {model} --host {host} --port {port}",
               "/health"),
    "llamacpp": ("llama-server -m {model} --host {host} --port {port}", "/health"),
}
HEALTH_POLL_SECONDS = 1.0
HEALTH_FAILURES_BEFORE_RESTART = 5
STOP_GRACE_SECONDS = 10.0
LOG_TAIL_LINES = 20


class ServeError(StartError):
    """A served model could not be started; the message has its log's last lines."""


@dataclass(frozen=True)
class ServeSpec:
    """How to start one inference server. ``per``: one per worker, or one per GPU of the worker
    (``CUDA_VISIBLE_DEVICES`` set to it; a dask-cuda worker's own GPU only)."""

    command: str
    health: str = "/v1/models"
    startup_timeout: float = 600.0
    per: str = "worker"
    env: dict = field(default_factory=dict)
    max_restarts: int = 3
    log_dir: str | None = None
    model: str | None = None  # the model a preset names (the default --model)

    def __post_init__(self) -> None:
        if self.per not in ("worker", "gpu"):
            raise ValueError(f"serve per must be 'worker' or 'gpu' (got {self.per!r})")
        if "{port}" not in self.command:
            raise ValueError("the serve command must contain {port} (the server's port): "
                             f"{self.command!r}")

    @classmethod
    def parse(cls, text: str, **options) -> "ServeSpec":
        """A command template, or ``PRESET:MODEL`` (vllm, sglang, llamacpp)."""
        name, _, model = text.partition(":")
        if name in PRESETS and model:
            command, health = PRESETS[name]
            options.setdefault("health", health)
            return cls(command.replace("{model}", shlex.quote(model)), model=model, **options)
        return cls(text, **options)

    def argv(self, host: str, port: int, gpu: str) -> list[str]:
        return shlex.split(self.command.format(host=host, port=port, gpu=gpu))


def _free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


# Runs the server with PR_SET_PDEATHSIG set (kept across exec): it gets SIGTERM when the worker
# process dies, even by kill -9. A shim rather than preexec_fn, which is unsafe in a threaded
# process such as a Dask worker.
_DIE_WITH_PARENT = ("import ctypes, os, signal, sys; ctypes.CDLL(None).prctl(1, signal.SIGTERM); "
                    "os.execvp(sys.argv[1], sys.argv[1:])")


class ServedProcess:
    """One server process: start, health, restart, stop (its whole process group)."""

    def __init__(self, spec: ServeSpec, host: str, gpu: str, log_path: Path):
        self.spec, self.host, self.gpu = spec, host, gpu
        self.port = _free_port(host)
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None
        self.restarts = 0
        self.health_failures = 0  # failed health checks in a row since the last start
        self.pids: list[int] = []

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def start(self) -> None:
        env = {**os.environ, **self.spec.env}
        if self.spec.per == "gpu":
            env["CUDA_VISIBLE_DEVICES"] = self.gpu
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            log.write(f"--- {time.strftime('%H:%M:%S')} starting: {self.spec.command}\n".encode())
            log.flush()
            argv = self.spec.argv(self.host, self.port, self.gpu)
            if shutil.which(argv[0], path=env.get("PATH")) is None:
                raise ServeError(f"the serve command {argv[0]!r} was not found on PATH on "
                                 f"{socket.gethostname()}; install it in the workers' environment "
                                 "or give its full path in --serve")
            self.proc = subprocess.Popen(
                [sys.executable, "-c", _DIE_WITH_PARENT, *argv], stdout=log,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                start_new_session=True)
        self.pids.append(self.proc.pid)
        self.health_failures = 0

    def healthy(self, timeout: float = 5.0) -> bool:
        try:
            url = f"http://{self.host}:{self.port}{self.spec.health}"
            with urllib.request.urlopen(url, timeout=timeout) as answer:
                return 200 <= answer.status < 300
        except (OSError, ValueError):
            return False

    def log_tail(self) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(collections.deque(lines, LOG_TAIL_LINES))

    async def wait_healthy(self) -> None:
        """Until the health path answers; ServeError if the process exits or the timeout ends."""
        deadline = time.monotonic() + self.spec.startup_timeout
        loop = asyncio.get_running_loop()
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServeError(f"the served model's process exited with status "
                                 f"{self.proc.returncode} before it was healthy; last lines of "
                                 f"{self.log_path}:\n{self.log_tail()}")
            if await loop.run_in_executor(None, self.healthy):
                return
            await asyncio.sleep(HEALTH_POLL_SECONDS)
        self.stop()
        raise ServeError(f"the served model did not answer {self.spec.health} within "
                         f"{self.spec.startup_timeout:g} s (--serve-startup-timeout); last lines "
                         f"of {self.log_path}:\n{self.log_tail()}")

    def stop(self) -> None:
        """SIGTERM the process group, SIGKILL it after STOP_GRACE_SECONDS."""
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(STOP_GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def _gpus(spec: ServeSpec) -> list[str]:
    """The GPUs this worker serves on: all it sees, or (dask-cuda, which lists the worker's own
    GPU first) only its own."""
    if spec.per != "gpu":
        return [""]
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
    """The worker plugin that owns this worker's servers."""

    name = PLUGIN_NAME

    def __init__(self, spec: ServeSpec):
        self.spec = spec
        self.servers: list[ServedProcess] = []
        self._supervisor: asyncio.Task | None = None

    async def setup(self, worker) -> None:
        host = worker.address.split("://", 1)[-1].rsplit(":", 1)[0]
        logs = Path(self.spec.log_dir or os.path.join(os.getcwd(), SERVE_LOGS))
        for gpu in _gpus(self.spec):
            server = ServedProcess(self.spec, host, gpu, logs / f"{socket.gethostname()}-"
                                   f"{os.getpid()}-{gpu or 'cpu'}.log")
            self.servers.append(server)
            server.start()
        try:
            await asyncio.gather(*(s.wait_healthy() for s in self.servers))
        except BaseException:
            self.teardown(worker)
            raise
        self._supervisor = asyncio.ensure_future(self._supervise())

    async def _supervise(self) -> None:
        """Restart a server that exited or stopped answering (at most max_restarts times)."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(HEALTH_POLL_SECONDS)
            for server in self.servers:
                exited = server.proc.poll() is not None
                if not exited:
                    ok = await loop.run_in_executor(None, server.healthy)
                    server.health_failures = 0 if ok else server.health_failures + 1
                if not (exited or server.health_failures >= HEALTH_FAILURES_BEFORE_RESTART):
                    continue
                if server.restarts >= self.spec.max_restarts:
                    continue  # left down: the pool's failure budget stops the run if it must
                logger.warning("served model at %s %s; restarting it (%d of %d)", server.url,
                               "exited" if exited else "stopped answering",
                               server.restarts + 1, self.spec.max_restarts)
                await loop.run_in_executor(None, server.stop)
                server.restarts += 1
                server.start()
                with contextlib.suppress(ServeError):
                    await server.wait_healthy()

    def teardown(self, worker) -> None:
        if self._supervisor is not None:
            self._supervisor.cancel()
        for server in self.servers:
            server.stop()

    def status(self) -> list[dict]:
        return [{"url": s.url, "pids": s.pids, "restarts": s.restarts, "log": str(s.log_path)}
                for s in self.servers]


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
def serving(client, spec: ServeSpec):
    """Start ``spec``'s servers on every worker of ``client`` (and on workers that join later),
    yield a callable giving every server's status, and stop them all at the end."""
    logger.info("starting the served model on every worker: %s", spec.command)
    try:
        client.register_plugin(ServePlugin(spec), name=PLUGIN_NAME)
    except BaseException:
        with contextlib.suppress(Exception):
            client.unregister_worker_plugin(PLUGIN_NAME)
        raise

    def status() -> list[dict]:
        return [s for servers in client.run(served_status).values() for s in servers]

    try:
        yield status
    finally:
        with contextlib.suppress(Exception):
            client.unregister_worker_plugin(PLUGIN_NAME)
