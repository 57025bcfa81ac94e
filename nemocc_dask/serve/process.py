"""One inference server process: its spec (a command template or a backend's preset), start in
its own process group with its output in a log file, health, restart, stop. Its supervision is
the shared loop of ``nemocc_dask.serve.supervision``.

Nothing of vLLM/SGLang/llama.cpp is imported: they are processes.
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
from typing import Literal

from nemocc_dask.config import setting
from nemocc_dask.serve.backends import BACKENDS, backend
from nemocc_dask.serve.supervision import HealthWatch, ServeError

logger = logging.getLogger(__name__)

SERVE_PER = ("worker", "gpu", "node")
SERVE_LOGS = "serve-logs"  # the servers' logs, in the run's output folder
LOG_TAIL_LINES = 20


@dataclass(frozen=True)
class ServeSpec:
    """How to start the inference servers of a run (``LLMConfig(serve=...)``; ``--serve`` and
    the ``--serve-*`` options on the command line). ``ServeSpec.parse`` reads a preset
    (``vllm:MODEL``) or a command template.

    Parameters
    ----------
    command:
        The server's command, with ``{port}`` (required), ``{host}``, ``{gpu}`` and ``{threads}``
        (the CPU cores it may use) filled on the worker.
    health:
        Path that answers 2xx once the model is loaded (default: the backend's; /v1/models for a
        command template).
    startup_timeout:
        Seconds a server may take to become healthy.
    per:
        One server per worker, per GPU of the worker (CUDA_VISIBLE_DEVICES set to it; a dask-cuda
        worker's own GPU only), or per node, shared by its workers (it sees every GPU they see).
    env:
        Environment of the server processes (KEY=VALUE, repeatable).
    max_restarts:
        Restarts of a server that exits or stops answering.
    log_dir:
        Folder of the servers' logs (the run sets OUTPUT/serve-logs).
    model:
        The model a preset names (the run's default --model).
    backend:
        The server program (``nemocc_dask.serve.backends``): vllm, sglang, llamacpp, or command.
    """

    command: str
    health: str | None = None
    startup_timeout: float = 600.0
    per: Literal["worker", "gpu", "node"] = "worker"
    env: dict[str, str] = field(default_factory=dict)
    max_restarts: int = 3
    log_dir: str | None = None
    model: str | None = None
    backend: str = "command"

    def __post_init__(self) -> None:
        if self.per not in SERVE_PER:
            raise ValueError(f"serve per must be one of {', '.join(SERVE_PER)} "
                             f"(got {self.per!r})")
        if "{port}" not in self.command:
            raise ValueError("the serve command must contain {port} (the server's port): "
                             f"{self.command!r}")
        if self.health is None:
            object.__setattr__(self, "health", backend(self.backend).health)

    @classmethod
    def parse(cls, text: str, **options) -> "ServeSpec":
        """A command template, or ``PRESET:MODEL [ARGS...]`` (``BACKENDS``: vllm, sglang,
        llamacpp; ARGS are added to the preset's command, a MODEL with spaces is quoted)."""
        name, _, rest = text.partition(":")
        words = shlex.split(rest) if name in BACKENDS else []
        if not words:
            return cls(text, **options)
        return cls(BACKENDS[name].command(words[0], words[1:]), model=words[0], backend=name,
                   **options)

    def argv(self, host: str, port: int, gpu: str, threads: int = 1) -> list[str]:
        """The command with ``{host}``, ``{port}``, ``{gpu}`` and ``{threads}`` (the CPU cores
        the server may use: the worker's share, or the node's for a shared server)."""
        return shlex.split(self.command.format(host=host, port=port, gpu=gpu, threads=threads))


def free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def kill_group(pgid: int, grace: float | None = None) -> None:
    """SIGTERM the process group ``pgid`` (a process of any parent), SIGKILL it after ``grace``
    seconds (default ``nemocc.serve.stop-grace-seconds``) if its leader still runs."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + (setting("serve.stop-grace-seconds") if grace is None
                                   else grace)
    while alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)


def health_ok(host: str, port: int, path: str, timeout: float = 5.0) -> bool:
    """Whether ``GET path`` on the server answers 2xx."""
    try:
        with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=timeout) as answer:
            return 200 <= answer.status < 300
    except (OSError, ValueError):
        return False


def log_tail(path: Path) -> str:
    try:
        lines = Path(path).read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(collections.deque(lines, LOG_TAIL_LINES))


async def wait_for_health(healthy, exited, deadline: float, spec: ServeSpec,
                          log_path: Path) -> None:
    """Poll ``healthy()`` (off the event loop) until it is true. ServeError with the last lines
    of ``log_path`` once ``exited()`` describes how the server ended, or at ``deadline``
    (``time.time()``, shared by the workers of a node)."""
    loop = asyncio.get_running_loop()
    while time.time() < deadline:
        ended = exited()
        if ended is not None:
            raise ServeError(f"the served model's process {ended} before it was healthy; last "
                             f"lines of {log_path}:\n{log_tail(log_path)}")
        if await loop.run_in_executor(None, healthy):
            return
        await asyncio.sleep(setting("serve.health-poll-seconds"))
    raise ServeError(f"the served model did not answer {spec.health} within "
                     f"{spec.startup_timeout:g} s (--serve-startup-timeout); last lines of "
                     f"{log_path}:\n{log_tail(log_path)}")


# Runs the server with PR_SET_PDEATHSIG set (kept across exec): it gets SIGTERM when the thread
# that started it dies (the worker's event loop: the worker process), even by kill -9. A shim
# rather than preexec_fn, which is unsafe in a threaded process such as a Dask worker.
_DIE_WITH_PARENT = ("import ctypes, os, signal, sys; ctypes.CDLL(None).prctl(1, signal.SIGTERM); "
                    "os.execvp(sys.argv[1], sys.argv[1:])")


class ServedProcess:
    """One server process: start, health, restart, stop (its whole process group). Started from
    the worker's event loop thread, so that it dies with the worker."""

    def __init__(self, spec: ServeSpec, host: str, gpu: str, log_path: Path,
                 port: int | None = None, threads: int | None = None):
        """``threads``: the CPU cores it may use (default: all of this machine's)."""
        self.spec, self.host, self.gpu = spec, host, gpu
        self.threads = max(1, threads or os.cpu_count() or 1)
        self.port = port or free_port(host)
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None
        self.restarts = 0
        self.watch = HealthWatch()
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
            argv = self.spec.argv(self.host, self.port, self.gpu, self.threads)
            if shutil.which(argv[0], path=env.get("PATH")) is None:
                raise ServeError(f"the serve command {argv[0]!r} was not found on PATH on "
                                 f"{socket.gethostname()}; install it in the workers' environment "
                                 "or give its full path in --serve")
            self.proc = subprocess.Popen(
                [sys.executable, "-c", _DIE_WITH_PARENT, *argv], stdout=log,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                start_new_session=True)
        self.pids.append(self.proc.pid)
        self.watch.reset()

    def healthy(self) -> bool:
        return health_ok(self.host, self.port, self.spec.health)

    async def wait_healthy(self) -> None:
        """Until the health path answers; ServeError if the process exits or the timeout ends
        (then it is stopped)."""
        def exited() -> str | None:
            return (None if self.proc.poll() is None
                    else f"exited with status {self.proc.returncode}")

        try:
            await wait_for_health(self.healthy, exited, time.time() + self.spec.startup_timeout,
                                  self.spec, self.log_path)
        except ServeError:
            self.stop()
            raise

    async def down(self) -> str | None:
        """Why the server is down (it exited, or stopped answering), or None."""
        if self.proc.poll() is not None:
            return "exited"
        ok = await asyncio.get_running_loop().run_in_executor(None, self.healthy)
        return "stopped answering" if self.watch.saw(ok) else None

    async def restart(self, why: str) -> bool:
        """Stop and start it again, unless it was restarted ``max_restarts`` times already
        (then it is left down and the pool's failure budget stops the run if it must)."""
        if self.restarts >= self.spec.max_restarts:
            return False
        logger.warning("served model at %s %s; restarting it (%d of %d)", self.url, why,
                       self.restarts + 1, self.spec.max_restarts)
        await asyncio.get_running_loop().run_in_executor(None, self.stop)
        self.restarts += 1
        self.start()
        return True

    def stop(self) -> None:
        """Stop its process group (``kill_group``) and reap it."""
        if self.proc is None or self.proc.poll() is not None:
            return
        kill_group(self.proc.pid)
        self.proc.wait()

    def leave(self) -> None:
        self.stop()

    def status(self) -> dict:
        return {"url": self.url, "pids": self.pids, "restarts": self.restarts,
                "log": str(self.log_path), "per": self.spec.per}
