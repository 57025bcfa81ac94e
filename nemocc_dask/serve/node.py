"""One server per node, shared by the node's workers (``--serve-per node``).

The workers of a node meet in a folder of the node's temporary directory named after the
scheduler and the serve command, holding ``state.json`` (the server's port, PID, generation,
restarts, users) and a lock file (``flock``). The first worker to join starts the server; the
others use it. Every user watches it: the first to see it down restarts it on the same port
(under the lock, so exactly once), the others adopt the new generation. The last worker to leave
stops its process group and removes the folder; a worker that leaves while others remain leaves
it running, but the server dies with the worker process that started it (PR_SET_PDEATHSIG) and
is then restarted by the others (not counted against ``max_restarts``).

Where each SLURM job has its own /tmp (a job_container plugin), workers of different jobs do
not meet: each job then starts its own server, as with ``--serve-per worker``.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import socket
import tempfile
import threading
import time
from pathlib import Path

from nemocc_dask.serve.process import (ServedProcess, ServeSpec, alive, health_ok, kill_group,
                                       wait_for_health)
from nemocc_dask.serve.supervision import HealthWatch

logger = logging.getLogger(__name__)


def meeting_folder(scheduler: str, spec: ServeSpec) -> Path:
    """The node-local folder where the workers of one cluster serving ``spec`` meet."""
    key = hashlib.sha1(f"{scheduler}|{spec!r}".encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"nemocc-serve-{os.getuid()}" / key


async def _off_loop(function, *args):
    """Run a blocking ``function`` on a thread; the event loop goes on meanwhile."""
    return await asyncio.get_running_loop().run_in_executor(None, function, *args)


def _live(users) -> list[str]:
    """The users (``PID-worker address``) whose process still runs."""
    return [u for u in users if alive(int(u.split("-")[0]))]


class NodeServer:
    """This worker's share of its node's server."""

    def __init__(self, spec: ServeSpec, host: str, folder: Path, log_path: Path, user: str):
        self.spec, self.host, self.folder, self.log_path, self.user = (spec, host, folder,
                                                                       log_path, user)
        self.state: dict = {}
        self.process: ServedProcess | None = None  # when this worker started the current one
        self.watch = HealthWatch()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.state['port']}/v1"

    def _acquire(self):
        """Take the node's lock (the lock file as it is now: the last worker to leave removes
        it, so one opened before that is dropped and opened again); close the file to free it."""
        while True:
            self.folder.mkdir(parents=True, exist_ok=True)
            lock = open(self.folder / "lock", "a")
            fcntl.flock(lock, fcntl.LOCK_EX)
            with contextlib.suppress(FileNotFoundError):
                if os.fstat(lock.fileno()).st_ino == os.stat(self.folder / "lock").st_ino:
                    return lock
            lock.close()

    @contextlib.contextmanager
    def _locked(self):
        """Hold the node's lock (blocking: for code off the event loop)."""
        lock = self._acquire()
        try:
            yield
        finally:
            lock.close()

    @contextlib.asynccontextmanager
    async def _locked_async(self):
        """Hold the node's lock, waiting for it on a thread so the worker's event loop runs on
        (the body runs on the loop: a server started there dies with this thread's process)."""
        lock = await asyncio.get_running_loop().run_in_executor(None, self._acquire)
        try:
            yield
        finally:
            lock.close()

    def _read(self) -> dict | None:
        try:
            return json.loads((self.folder / "state.json").read_text())
        except (OSError, ValueError):
            return None

    def _write(self, state: dict) -> None:
        tmp = self.folder / f"state.json.{os.getpid()}"
        tmp.write_text(json.dumps(state))
        os.replace(tmp, self.folder / "state.json")

    def _start(self, state: dict | None, counted: bool) -> dict:
        """Start a new generation (under the lock) on the previous one's port; returns the state
        with this worker as its starter."""
        port = state["port"] if state else None
        if self.process is not None:
            self.process.proc.poll()  # reap the generation this worker started before
        self.process = ServedProcess(self.spec, self.host, os.environ.get(
            "CUDA_VISIBLE_DEVICES", ""), self.log_path, port)
        self.process.start()
        previous = state or {"generation": 0, "restarts": 0, "pids": [], "users": []}
        new = {**previous, "port": self.process.port, "pid": self.process.proc.pid,
               "generation": previous["generation"] + 1, "started": time.time(), "up": False,
               "log": str(self.log_path), "owner": self.user,
               "pids": previous["pids"] + [self.process.proc.pid],
               "restarts": previous["restarts"] + (1 if counted else 0)}
        self._write(new)
        return new

    async def join(self) -> None:
        """Start the node's server or use the one running; return once it answers."""
        async with self._locked_async():
            state = self._read()
            if state is not None:
                state["users"] = _live(state["users"])
                if not state["users"]:  # left over from an earlier run
                    if alive(state["pid"]):
                        await _off_loop(kill_group, state["pid"])
                    state = None
            if state is None or not alive(state["pid"]):
                state = self._start(state, counted=False)
            state["users"].append(self.user)
            self._write(state)
        self.state = state
        await self.wait_healthy()

    async def wait_healthy(self) -> None:
        """Until the current generation answers; ServeError if it exits or does not answer in
        time (the starter then marks it up for the other users)."""
        if self.process is not None and self.process.proc.pid == self.state["pid"]:
            await self.process.wait_healthy()
            async with self._locked_async():
                state = self._read()
                if state and state["generation"] == self.state["generation"]:
                    state["up"] = True
                    self._write(state)
                    self.state = state
            return
        pid = self.state["pid"]

        def exited() -> str | None:
            return None if alive(pid) else f"(PID {pid}) exited"

        await wait_for_health(self._healthy, exited,
                              self.state["started"] + self.spec.startup_timeout, self.spec,
                              Path(self.state["log"]))

    def _healthy(self) -> bool:
        return health_ok(self.host, self.state["port"], self.spec.health)

    def _starting(self, state: dict) -> bool:
        return not state["up"] and time.time() - state["started"] < self.spec.startup_timeout

    async def down(self) -> str | None:
        """Why the node's server is down (exited, or stopped answering while not starting), or
        None; a generation started by another worker is adopted. The worker's event loop never
        waits here: health checks run on a thread."""
        if self.process is not None:
            self.process.proc.poll()  # reap it if it exited
        state = self._read() or self.state
        if state["generation"] != self.state["generation"]:
            self.state = state
            self.watch.reset()
        if not alive(state["pid"]):
            return "exited"
        ok = await _off_loop(self._healthy)
        return "stopped answering" if self.watch.saw(ok or self._starting(state)) else None

    async def restart(self, why: str) -> bool:
        """Restart the node's server unless another worker already has (once, under the node's
        lock, waited for on a thread), within max_restarts (a restart after its starting
        worker left is not counted)."""
        async with self._locked_async():
            state = self._read() or self.state
            if state["generation"] != self.state["generation"]:
                self.state = state  # another worker restarted it
                return False
            orphaned = state["owner"] not in state["users"]
            if state["restarts"] >= self.spec.max_restarts and not orphaned:
                return False
            logger.warning("the node's served model at %s %s; restarting it", self.url,
                           "left with the worker that started it" if orphaned else why)
            if alive(state["pid"]):
                await _off_loop(kill_group, state["pid"])
            self.state = self._start(state, counted=not orphaned)
        self.watch.reset()
        return True

    def leave(self) -> None:
        """Leave the node's server; the last worker to leave stops it."""
        with self._locked():
            state = self._read()
            if state is not None:
                state["users"] = _live(u for u in state["users"] if u != self.user)
                if state["users"]:
                    self._write(state)
                else:
                    kill_group(state["pid"])
            if not state or not state["users"]:  # the last one: nothing left in the folder
                for name in ("state.json", "lock"):
                    (self.folder / name).unlink(missing_ok=True)
                with contextlib.suppress(OSError):
                    self.folder.rmdir()
        if self.process is not None and self.process.proc.poll() is None:
            # it runs on for the others (until this process exits); reap it when it ends
            threading.Thread(target=self.process.proc.wait, daemon=True,
                             name="nemocc-serve-reap").start()

    def status(self) -> dict:
        state = self._read() or self.state
        return {"url": self.url, "pids": state["pids"], "restarts": state["restarts"],
                "log": state["log"], "per": "node", "workers": len(state["users"]),
                "host": socket.gethostname()}
