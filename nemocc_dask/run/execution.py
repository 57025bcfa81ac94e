"""Running the partition tasks: on the distributed client when there is one (else Dask's local
scheduler in a thread), each counted as it finishes; SIGTERM or Ctrl-C drains every worker's pools
(what is on the wire is answered and journaled) and ends the run with an account of what was
kept."""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import dask

from nemocc_dask.config import setting
from nemocc_dask.errors import Interrupted, Preempted

if TYPE_CHECKING:  # the progress line (run.progress) imports this module
    from nemocc_dask.run.progress import Progress

logger = logging.getLogger(__name__)


def distributed_client():
    """The current ``distributed`` client, or None (no distributed, or no client)."""
    try:
        from distributed import get_client

        return get_client()
    except (ImportError, ValueError):
        return None


def register_pool_plugin() -> None:
    """Have every worker (also ones that join later) close its client pools when it closes."""
    client = distributed_client()
    if client is not None:
        from nemocc_dask.llm.pool_plugin import PoolsPlugin
        from nemocc_dask.llm.pools import PLUGIN_NAME

        client.register_plugin(PoolsPlugin(), name=PLUGIN_NAME)


class StopRequested(BaseException):
    """Raised in the driver's main thread by SIGTERM or Ctrl-C (SIGINT) while partitions run."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum

    @property
    def name(self) -> str:
        return "Ctrl-C" if self.signum == signal.SIGINT else signal.Signals(self.signum).name

    def stopped(self, message: str) -> Preempted:
        """The error the run ends with: exit 130 for Ctrl-C, 75 (requeue) for SIGTERM."""
        kind = Interrupted if self.signum == signal.SIGINT else Preempted
        return kind(f"{self.name}: {message}")


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@contextlib.contextmanager
def signals_stop_the_run():
    """While partitions run, SIGTERM or Ctrl-C raises StopRequested in the main thread (a
    second Ctrl-C, once the handlers are restored, interrupts the drain itself). Elsewhere, or
    off the main thread, signals keep their handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise StopRequested(signum)

    previous = {signum: signal.signal(signum, stop) for signum in STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _drain(client, futures, progress: Progress, where: dict, stop: StopRequested) -> Preempted:
    """Stop every worker's pools from sending more, let what is on the wire be answered and
    journaled (at most ``nemocc.drain-seconds``), then cancel what is left. Returns the error
    that ends the run, saying what was kept."""
    from distributed import wait

    from nemocc_dask.llm.pools import requests_in_flight

    grace = float(setting("drain-seconds"))
    logger.warning("%s: stopping; waiting up to %.0f s for the requests in flight", stop.name,
                   grace)
    in_flight = _drain_workers(client, f"the run is stopping ({stop.name})")
    with contextlib.suppress(Exception):
        wait(futures, timeout=grace)
    for future in futures:
        if future.status == "finished":
            progress.finished(where[future.key], future.result())
    left = in_flight
    with contextlib.suppress(Exception):
        left = sum(client.run(requests_in_flight).values())
    client.cancel(futures)
    return stop.stopped(_what_was_kept(progress, in_flight, left))


def _what_was_kept(progress: Progress, in_flight: int, left: int) -> str:
    kept = f"{progress.done} of {progress.total} partitions finished"
    if in_flight:
        kept += (f"; of the {in_flight} requests in flight, {in_flight - left} were answered "
                 "and journaled")
        if left:
            kept += f" and {left} were not (they are sent again on resume)"
    else:
        kept += "; no request was in flight"
    return kept + ". Rerun the same command (or requeue the job) to resume"


def _drain_workers(client, reason: str) -> int:
    """Stop every worker's pools from sending (a failure to reach them is logged); returns the
    requests in flight on the workers at that moment."""
    from nemocc_dask.llm.pools import drain_pools

    try:
        return sum(client.run(drain_pools, reason).values())
    except Exception as exc:
        logger.warning("could not drain the workers' pools: %s: %s", type(exc).__name__, exc)
        return 0


def drain_everywhere(reason: str) -> None:
    """Stop every pool of the run from sending (the workers' and this process's)."""
    from nemocc_dask.llm.pools import drain_pools

    drain_pools(reason)
    client = distributed_client()
    if client is not None:
        _drain_workers(client, reason)


def compute_here(tasks: list, out_dirs: list[Path], progress: Progress) -> None:
    """Without a distributed client: Dask's local scheduler in a thread, each partition counted
    as it finishes. SIGTERM (or Ctrl-C) drains this process's pools: nothing more is sent, what
    is on the wire is answered and journaled (at most ``nemocc.drain-seconds``)."""
    from dask.callbacks import Callback

    from nemocc_dask.llm.pools import drain_pools, requests_in_flight

    where = {task.key: out_dir for task, out_dir in zip(tasks, out_dirs)}

    class CountFinished(Callback):
        def _posttask(self, key, result, dsk, state, worker_id):
            if key in where:
                progress.finished(where[key], result)

    outcome: dict[str, BaseException] = {}

    def run() -> None:
        try:
            with CountFinished():
                dask.compute(*tasks)
        except BaseException as exc:  # raised again in the caller's thread
            outcome["error"] = exc

    drain_pools(None)  # pools left drained by a stopped run in this process send again
    thread = threading.Thread(target=run, daemon=True, name="nemocc-compute")
    thread.start()
    try:
        with signals_stop_the_run():
            while thread.is_alive():
                thread.join(0.2)
    except BaseException as exc:
        grace = float(setting("drain-seconds"))
        logger.warning("%s: stopping; waiting up to %.0f s for the requests in flight",
                       exc.name if isinstance(exc, StopRequested) else type(exc).__name__,
                       grace)
        in_flight = drain_pools("the run is stopping")
        thread.join(grace)
        if isinstance(exc, StopRequested):
            raise exc.stopped(_what_was_kept(progress, in_flight, requests_in_flight())
                              ) from None
        raise
    if "error" in outcome:
        raise outcome["error"]


def compute(tasks: list, out_dirs: list[Path], progress: Progress) -> None:
    """Run the partition tasks (task i writes into ``out_dirs[i]``) on the distributed client if
    there is one, else locally (``compute_here``). On the first failed partition the others are
    cancelled and its exception is raised. SIGTERM drains the run (see ``_drain``) and raises
    Preempted."""
    client = distributed_client()
    if client is None:
        compute_here(tasks, out_dirs, progress)
        return
    from distributed import as_completed

    from nemocc_dask.llm.pools import drain_pools

    with contextlib.suppress(Exception):
        client.run(drain_pools, None)  # workers kept from a stopped run send again
    futures = client.compute(tasks)
    where = {future.key: out_dir for future, out_dir in zip(futures, out_dirs)}
    try:
        with signals_stop_the_run():
            for future in as_completed(futures):
                progress.finished(where[future.key], future.result())
    except StopRequested as stop:
        raise _drain(client, futures, progress, where, stop) from None
    except BaseException:
        client.cancel(futures)
        raise
