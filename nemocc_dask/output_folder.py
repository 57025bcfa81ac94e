"""The output folder of a run: may this run use it (read-only checks), a lock against a second
run writing it at the same time, and setting it up once every check has passed.

``check_output`` only reads; ``OutputLock`` and ``prepare_output`` are the first writes of a run,
so a run refused for any reason leaves the folder exactly as it was.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from pathlib import Path

from nemocc_dask import io, storage
from nemocc_dask.errors import StartError

logger = logging.getLogger(__name__)
MANIFEST = "run.json"
LOCK = ".nemocc.lock"
SERVE_LOGS = "serve-logs"  # written by a served model (nemocc_dask.serve) from the run's start
OWNED = ("parts", "rejects", "stats", "journal", MANIFEST, "report.json")
HEARTBEAT_SECONDS = 10.0
STALE_AFTER_SECONDS = 60.0


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


def check_output(out_dir: Path, material: dict, overwrite: bool) -> str:
    """Whether this run may use ``out_dir``, without changing anything in it.

    Returns ``"new"`` (missing or empty folder), ``"resume"`` (same run identity) or ``"replace"``
    (``overwrite``: the earlier run is deleted once every check has passed). Raises OutputError
    for a folder with other files, another run's identity without ``overwrite``, or a live lock.
    """
    storage.refresh(out_dir)
    entries = sorted(p.name for p in out_dir.iterdir() if p.name not in (LOCK, SERVE_LOGS)) \
        if out_dir.exists() else []
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
    if previous.get("fingerprint") != io.digest(material):
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
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _live_holder(lock: dict | None, path: Path) -> dict | None:
    """The lock's contents if a live run holds it (recent heartbeat and, on this host, a live
    process), else None (no lock, or a stale one that may be taken over)."""
    if lock is None:
        return None
    age = time.time() - max(float(lock.get("heartbeat", 0)), path.stat().st_mtime
                            if path.exists() else 0)
    if age > STALE_AFTER_SECONDS:
        return None
    if lock.get("host") == socket.gethostname() and not _pid_alive(int(lock.get("pid", 0))):
        return None
    return lock


def check_lock(out_dir: Path) -> None:
    """Raise OutputError if another live run holds ``out_dir``'s lock."""
    path = out_dir / LOCK
    holder = _live_holder(_read_lock(path), path)
    if holder is not None and not (holder.get("host") == socket.gethostname()
                                   and int(holder.get("pid", 0)) == os.getpid()):
        age = time.time() - float(holder.get("heartbeat", 0))
        raise OutputError(
            f"output folder {str(out_dir)!r} is being written by another run (host "
            f"{holder.get('host')}, pid {holder.get('pid')}, heartbeat {age:.0f} s ago); wait "
            f"for it to end or stop it. A lock without a heartbeat for {STALE_AFTER_SECONDS:.0f} "
            "s is taken over")


class OutputLock:
    """A lock file (host, pid, heartbeat) that keeps a second run out of an output folder.

    Taken after every check has passed; refreshed every ``HEARTBEAT_SECONDS`` by a thread; taken
    over when its holder is gone (dead pid on this host, or no heartbeat for
    ``STALE_AFTER_SECONDS``); removed when the run ends."""

    def __init__(self, out_dir: Path):
        self.path = out_dir / LOCK
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="nemocc-lock", daemon=True)

    def _contents(self) -> bytes:
        return json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                           "heartbeat": time.time()}).encode()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            try:
                io.atomic_write_bytes(self.path, self._contents())
            except OSError as exc:  # the next beat tries again; the lock goes stale if none can
                logger.warning("cannot refresh the lock %s: %s", self.path, exc)

    def __enter__(self) -> "OutputLock":
        if not self._created_exclusively():
            check_lock(self.path.parent)  # raises if a live run holds it
            io.atomic_write_bytes(self.path, self._contents())  # take it (over a stale one)
        self._thread.start()
        return self

    def _created_exclusively(self) -> bool:
        """Create the lock file if none exists (locally, atomically); False when one exists or
        the store has no exclusive create (object stores: the lock is advisory there)."""
        if storage.is_remote(self.path):
            return False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as fh:
            fh.write(self._contents())
        return True

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        lock = _read_lock(self.path)
        if lock and lock.get("pid") == os.getpid() and lock.get("host") == socket.gethostname():
            self.path.unlink(missing_ok=True)
