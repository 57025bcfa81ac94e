"""Leases that fence, as a user meets them: an external scheduler and two worker processes, one of
them stopped for 15 s in the middle of a CLI run (SIGSTOP: in life a GC pause, swap, a hung RPC)
and then resumed. The server never sees more than --max-in-flight, and the output equals a clean
run's."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
from conftest import make_docs

from nemocc_dask.testing.mock import MockLLMServer

BUDGET = 8


def _start(args: list[str], log) -> subprocess.Popen:
    return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _wait_for(path, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not start")
        time.sleep(0.2)


def _rows(folder) -> pd.DataFrame:
    return pd.read_parquet(folder / "parts").sort_values("id").reset_index(drop=True)


def _run(args: list[str], log) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "nemocc_dask.cli", "run", *args],
                            stdout=log, stderr=subprocess.STDOUT)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_stalled_worker_is_fenced_and_the_server_never_sees_more_than_the_budget(tmp_path):
    docs = tmp_path / "docs.parquet"
    make_docs(400, paragraphs=1).to_parquet(docs)
    scheduler_file = tmp_path / "scheduler.json"
    log = open(tmp_path / "cluster.log", "w")
    procs = [_start([sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
                     "--port", "0", "--no-dashboard", "--scheduler-file", str(scheduler_file)],
                    log)]
    try:
        _wait_for(scheduler_file, "the scheduler")
        workers = [_start([sys.executable, "-m", "distributed.cli.dask_worker", "--nthreads", "2",
                           "--no-dashboard", "--no-nanny", "--host", "127.0.0.1",
                           "--scheduler-file",
                           str(scheduler_file)], log) for _ in range(2)]
        procs += workers
        with MockLLMServer(latency=0.3, track_in_flight=True) as server:
            common = ["--input", str(docs), "--task", "distill", "--base-url", server.base_url,
                      "--model", "mock", "--max-in-flight", str(BUDGET), "--no-progress",
                      "--rows-per-partition", "10"]
            run = _run([*common, "--output", str(tmp_path / "out"), "--scheduler-file",
                        str(scheduler_file)], open(tmp_path / "run.log", "w"))
            deadline = time.monotonic() + 60
            while server.stats.completed < 20 and time.monotonic() < deadline:
                time.sleep(0.1)
            stalled_at = time.monotonic()
            os.kill(workers[0].pid, signal.SIGSTOP)
            time.sleep(15)
            os.kill(workers[0].pid, signal.SIGCONT)
            resumed_at = time.monotonic()
            assert run.wait(timeout=240) == 0, (tmp_path / "run.log").read_text()
            during = [n for t, n in server.stats.in_flight_samples if t > stalled_at]
            peak = server.stats.max_in_flight
            # the clean run: the same command, no stall, its own folder
            clean = _run([*common, "--output", str(tmp_path / "clean"), "--workers", "1"],
                         open(tmp_path / "clean.log", "w"))
            assert clean.wait(timeout=240) == 0, (tmp_path / "clean.log").read_text()
    finally:
        for proc in reversed(procs):  # each worker gone before the scheduler stops
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGCONT)
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:  # nothing of the test may outlive it
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()
    assert peak <= BUDGET, (peak, (tmp_path / "cluster.log").read_text()[-3000:])
    assert max(during) == BUDGET  # the other worker took the stalled one's room meanwhile
    assert resumed_at - stalled_at >= 15
    # (whether the stopped worker held room at that instant depends on timing: the warning for
    # a late report is checked in test_budget.py on scripted reports)
    pd.testing.assert_frame_equal(_rows(tmp_path / "out"), _rows(tmp_path / "clean"))
