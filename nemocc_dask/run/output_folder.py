"""The output folder of a run: may this run use it (read-only checks), a lock against a second
run writing it at the same time, and setting it up once every check has passed.

``check_output`` only reads; ``OutputLock`` and ``prepare_output`` are the first writes of a run,
so a run refused for any reason leaves the folder exactly as it was.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Callable

from nemocc_dask import io
from nemocc_dask.config import setting
from nemocc_dask.errors import RunError, StartError
from nemocc_dask.io import storage
from nemocc_dask.recipe.presets import GENERATION_FIELDS
from nemocc_dask.serve.process import SERVE_LOGS  # written by a served model from the start

logger = logging.getLogger(__name__)
MANIFEST = "run.json"
LOCK = ".nemocc.lock"
GUARD = ".nemocc.lock.guard"  # flock'ed while a run reads and writes the lock
OWNED = ("parts", "rejects", "stats", "journal", MANIFEST, "report.json", "input-cache.json")


class OutputError(StartError, ValueError):
    """The output folder cannot be used for this run; the message says why and what to do."""


def _what_changed(old: dict, new: dict) -> str:
    """A sentence naming the parts of the run identity that differ between two manifests."""
    changed = []
    old_inputs, new_inputs = old.get("inputs") or {}, new.get("inputs") or {}
    if isinstance(old_inputs, dict) and isinstance(new_inputs, dict):
        if old_inputs.get("files") != new_inputs.get("files"):
            changed.append("the input files (paths, sizes or modification times)")
        elif old_inputs.get("partitions") != new_inputs.get("partitions"):
            changed.append(f"the partition map ({len(old_inputs.get('partitions') or [])} "
                           f"partitions before, {len(new_inputs.get('partitions') or [])} now: "
                           "use the same --rows-per-partition as the first run)")
    elif old_inputs != new_inputs:
        changed.append("the inputs")
    names = {"task": "the task (preset, prompts or post-processing)", "llm": "the model or client",
             "settings": "the generation settings", "tokenizer": "the tokenizer",
             "seed": "the seed", "id_field": "the id field", "route": "the quality routing"}
    changed += [label for key, label in names.items() if old.get(key) != new.get(key)]
    return ", ".join(changed) or "the run's settings"


def _comparable(material: dict, leave_out: tuple[str, ...] = ()) -> dict:
    """``material`` as two runs' identities are compared: without ``leave_out`` and without the
    task's generation settings, which ``settings`` states as sent (a run started before they
    moved into the task preset has the preset's defaults there, its overrides in ``settings``
    only: it is the same run)."""
    task = material.get("task")
    if isinstance(task, dict):
        task = {k: v for k, v in task.items() if k not in (*GENERATION_FIELDS, "extra_body")}
    kept = {k: (task if k == "task" else v) for k, v in material.items() if k not in leave_out}
    return json.loads(json.dumps(kept, default=str))


def require_usable(out_dir) -> None:
    """OutputError when a local ``out_dir`` cannot hold a run: it is a file, or the nearest
    existing folder at or above it is not writable (read-only checks; object stores are
    checked by ``check_output``)."""
    if storage.is_remote(out_dir):
        return
    path = existing = Path(out_dir)
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        where = ("is a file" if existing == path else
                 f"cannot be created: {str(existing)!r} is a file")
        raise OutputError(f"output folder {str(path)!r} {where}; choose a folder (a new one, or "
                          "one an earlier run of this command wrote)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(f"output folder {str(path)!r} cannot be written: {str(existing)!r} is "
                          "not writable by this user (or is on a read-only filesystem); choose "
                          "another folder or fix its permissions")


def check_output(out_dir: Path, material: dict, overwrite: bool,
                 unknown: tuple[str, ...] = ()) -> str:
    """Whether this run may use ``out_dir``, without changing anything in it.

    Returns ``"new"`` (missing or empty folder), ``"resume"`` (same run identity) or ``"replace"``
    (``overwrite``: the earlier run is deleted once every check has passed). Raises OutputError
    for a folder with other files, another run's identity without ``overwrite``, or a live lock.
    ``unknown``: parts of the identity not known yet (before a served model starts: its
    tokenizer and context), compared later.
    """
    storage.refresh(out_dir)
    storage.require_bucket(out_dir, "output folder")
    entries = sorted(p.name for p in out_dir.iterdir()
                     if p.name not in (LOCK, GUARD, SERVE_LOGS)) if out_dir.exists() else []
    if not entries:
        check_lock(out_dir)
        return "new"
    manifest = out_dir / MANIFEST
    if not manifest.exists():
        foreign = entries[:5]
        raise OutputError(f"output folder {str(out_dir)!r} is not empty and holds no "
                          f"nemocc-dask run (found {foreign}); choose an empty or new folder")
    check_lock(out_dir)
    previous = json.loads(manifest.read_text())
    if overwrite:
        return "replace"
    same = (not unknown and previous.get("fingerprint") == io.digest(material)) or \
        _comparable(previous.get("material") or {}, unknown) == _comparable(material, unknown)
    if not same:
        raise OutputError(f"output folder {str(out_dir)!r} holds a run with different "
                          f"{_what_changed(previous.get('material') or {}, material)}; rerun "
                          "with the same command to resume it, or pass --overwrite to start over")
    return "resume"


def prepare_output(out_dir: Path, material: dict, mode: str) -> None:
    """Set up ``out_dir`` for the run (call while holding its lock, after every check): delete the
    earlier run for ``"replace"``, write ``run.json``, remove temporary files of killed writers."""
    if mode == "replace":
        for name in OWNED:
            storage.remove_tree(out_dir / name)
    if not (out_dir / MANIFEST).exists():
        io.atomic_write_bytes(out_dir / MANIFEST, json.dumps(
            {"fingerprint": io.digest(material), "material": material}, indent=1,
            default=str).encode())
    removed = io.remove_stale_temps(out_dir)
    if removed:
        logger.info("removed %d temporary file(s) left by an interrupted run in %s", removed,
                    out_dir)


def _read_lock(path: Path) -> dict | None:
    """The lock's contents; ``{}`` for a lock file that cannot be read as a lock (unknown
    holder), None when there is none."""
    try:
        lock = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return lock if isinstance(lock, dict) else {}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _process_started(pid: int) -> str | None:
    """When process ``pid`` started (Linux clock ticks since boot), to tell a reused PID apart;
    None where /proc does not say."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _live_holder(lock: dict | None, path: Path) -> dict | None:
    """The lock's contents if a live run holds it, else None (no lock, or a stale one that may
    be taken over). On this host the holder's process decides: alive (the same process, not a
    reused PID) is live, whatever its heartbeat. On another host: a heartbeat within
    ``nemocc.lock.stale-after-seconds``. A lock file that cannot be read is live until it is
    that old."""
    if lock is None:
        return None
    if lock.get("host") == socket.gethostname() and "pid" in lock:
        pid = int(lock["pid"])
        started = lock.get("started")
        if not _pid_alive(pid) or (started is not None and _process_started(pid) != started):
            return None
        return lock
    with contextlib.suppress(OSError):
        beat = max(float(lock.get("heartbeat", 0)), path.stat().st_mtime)
        if time.time() - beat <= setting("lock.stale-after-seconds"):
            return lock
    return None


def _held_by_another(out_dir: Path) -> dict | None:
    holder = _live_holder(_read_lock(out_dir / LOCK), out_dir / LOCK)
    if holder is not None and not (holder.get("host") == socket.gethostname()
                                   and holder.get("pid") == os.getpid()):
        return holder
    return None


def _describe(out_dir: Path, holder: dict) -> str:
    if not holder:
        return (f"output folder {str(out_dir)!r} has a lock file ({LOCK}) that is not a lock "
                f"(written by a run interrupted while writing it?); it is taken over once it is "
                f"{setting('lock.stale-after-seconds'):.0f} s old, or delete it if no run uses the "
                "folder")
    age = time.time() - float(holder.get("heartbeat", 0))
    return (f"output folder {str(out_dir)!r} is being written by another run (host "
            f"{holder.get('host')}, pid {holder.get('pid')}, heartbeat {age:.0f} s ago); wait "
            "for it to end or stop it (--wait-for-lock SECONDS waits for it). A lock is taken "
            "over when its process has died (same host) or after "
            f"{setting('lock.stale-after-seconds'):.0f} s without a heartbeat (another host)")


def check_lock(out_dir: Path) -> None:
    """Raise OutputError if another live run holds ``out_dir``'s lock."""
    holder = _held_by_another(out_dir)
    if holder is not None:
        raise OutputError(_describe(out_dir, holder))


def wait_for_lock(out_dir: Path, seconds: float) -> None:
    """Wait up to ``seconds`` for another run to release ``out_dir`` (a requeued job that starts
    while the old one drains), then check as ``check_lock``."""
    deadline = time.monotonic() + seconds
    while _held_by_another(out_dir) is not None and time.monotonic() < deadline:
        time.sleep(min(2.0, max(0.1, deadline - time.monotonic())))
    check_lock(out_dir)


class LockLost(RunError):
    """Another run took this run's output folder while it was running."""


class OutputLock:
    """A lock file (host, pid, process start, heartbeat, a token of its own) that keeps a second
    run out of an output folder.

    Taken after every check has passed. On a local or shared file system every read-decide-write
    of the lock happens under ``flock`` on a guard file next to it, and the lock is written whole
    (temporary file and rename), so two runs starting at the same instant cannot both win; on an
    object store it is advisory. Refreshed every ``nemocc.lock.heartbeat-seconds`` by a thread,
    which first checks that the lock is still this run's: if another run has taken it,
    ``on_lost(message)`` is called (the runner stops sending at once) and the heartbeat stops.
    Removed when the run ends (only if still ours)."""

    def __init__(self, out_dir: Path, on_lost: Callable[[str], None] | None = None):
        self.out_dir = out_dir
        self.path = out_dir / LOCK
        self.token = uuid.uuid4().hex
        self.lost: str | None = None
        self._on_lost = on_lost
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="nemocc-lock", daemon=True)

    def _contents(self) -> bytes:
        return json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                           "started": _process_started(os.getpid()), "token": self.token,
                           "heartbeat": time.time()}).encode()

    @contextlib.contextmanager
    def _guard(self):
        """Serialise lock decisions between processes (flock; nothing on an object store)."""
        if storage.is_remote(self.path):
            yield
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with open(self.out_dir / GUARD, "a") as guard:
            fcntl.flock(guard, fcntl.LOCK_EX)
            yield

    def _mine(self) -> bool:
        return (_read_lock(self.path) or {}).get("token") == self.token

    def __enter__(self) -> "OutputLock":
        with self._guard():
            check_lock(self.out_dir)  # raises if a live run holds it
            io.atomic_write_bytes(self.path, self._contents())  # take it (over a stale one)
        if not self._mine():  # an object store: another run wrote at the same moment
            raise OutputError(_describe(self.out_dir, _read_lock(self.path) or {}))
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(setting("lock.heartbeat-seconds")):
            try:
                with self._guard():
                    if not self._mine():
                        self._lose()
                        return
                    io.atomic_write_bytes(self.path, self._contents())
            except OSError as exc:  # the next beat tries again; the lock goes stale if none can
                logger.warning("cannot refresh the lock %s: %s", self.path, exc)

    def _lose(self) -> None:
        holder = _read_lock(self.path)
        self.lost = (f"another run (host {(holder or {}).get('host')}, pid "
                     f"{(holder or {}).get('pid')}) has taken the lock of output folder "
                     f"{str(self.out_dir)!r}; this run stopped sending at once and leaves the "
                     "folder to it (the answers received are journaled)")
        logger.error("%s", self.lost)
        if self._on_lost is not None:
            self._on_lost(self.lost)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        with contextlib.suppress(OSError), self._guard():
            if self._mine():
                self.path.unlink(missing_ok=True)
