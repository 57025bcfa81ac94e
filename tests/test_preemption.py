"""SIGTERM (a SLURM time limit, preemption, scancel) stops a run cleanly: requests on the wire are
answered and journaled, nothing else is sent, the exit status is 75, and the rerun (or the requeued
job) finishes with output equal to an uninterrupted run and no request paid twice."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import make_docs
from test_cluster import slurm_test
from test_runner_e2e import answers_so_far, read_parts

from nemocc_dask import LLMConfig
from nemocc_dask.run.runner import run_to_parquet
from nemocc_dask.testing.mock import MockLLMServer

pytestmark = pytest.mark.slow
KEY = ["id", "segment_id"]


def _docs(tmp_path: Path, n: int) -> Path:
    path = tmp_path / "docs.parquet"
    pq.write_table(pa.Table.from_pandas(make_docs(n, paragraphs=1), preserve_index=False), path)
    return path


def _run_args(docs: Path, out: Path, server) -> list[str]:
    return ["run", "--task", "distill", "--input", str(docs), "--output", str(out),
            "--base-url", server.base_url, "--model", "mock", "--max-in-flight", "8",
            "--rows-per-partition", "20", "--no-progress"]


def _reference(tmp_path, docs, cluster_client) -> tuple:
    """(parts, requests) of an uninterrupted run."""
    with MockLLMServer() as server:
        run_to_parquet(docs, tmp_path / "reference", "distill",
                       LLMConfig(base_url=server.base_url, model="mock", max_in_flight=8),
                       rows_per_partition=20, show_progress=False)
        requests = server.stats.requests
    return read_parts(tmp_path / "reference").sort_values(KEY).reset_index(drop=True), requests


def _wait_for_answers(out: Path, at_least: int, timeout: float = 120, proc=None,
                      log: Path | None = None) -> None:
    """Until ``at_least`` answers are journaled in ``out``; fails with the end of ``log`` (the
    run's stderr) if ``proc`` ended first or the answers did not come."""
    deadline = time.time() + timeout
    while time.time() < deadline and answers_so_far(out) < at_least:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the run ended (exit {proc.returncode}) before {at_least} "
                                 f"answers: {_read(log)[-3000:] if log else ''}")
        time.sleep(0.1)
    assert answers_so_far(out) >= at_least, \
        f"the run never got going: {_read(log)[-3000:] if log else ''}"


def _sigterm_mid_run(args: list[str], out: Path, server) -> str:
    """Start ``args``, SIGTERM it once answers arrive, check the clean stop (exit 75 with the
    rerun advice, nothing left on the wire, every answer received kept); its stderr (kept in a
    file, so that the run never waits on a full pipe)."""
    log = out.parent / f"{out.name}-stderr.txt"
    with log.open("w") as stderr_file:
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=stderr_file, text=True)
        try:
            _wait_for_answers(out, 24, proc=proc, log=log)
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
    stderr = _read(log)
    stopped_at = server.stats.requests
    assert proc.returncode == 75, stderr[-2000:]
    assert "Rerun the same command" in stderr
    assert server.stats.completed == stopped_at, stderr[-3000:]  # nothing left on the wire
    assert answers_so_far(out) == stopped_at  # every answer received was kept
    return stderr


def test_sigterm_drains_then_the_rerun_pays_nothing_twice(tmp_path, cluster_client):
    docs = _docs(tmp_path, 120)
    expected, reference_requests = _reference(tmp_path, docs, cluster_client)
    out = tmp_path / "out"
    with MockLLMServer(latency=0.5) as server:
        args = [sys.executable, "-m", "nemocc_dask.cli", *_run_args(docs, out, server),
                "--workers", "2", "--threads-per-worker", "2"]
        stderr = _sigterm_mid_run(args, out, server)
        assert "Traceback" not in stderr
        assert len(list((out / "parts").glob("*.parquet"))) < 6  # it stopped mid-run
        done = subprocess.run(args, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        total_requests = server.stats.requests
    assert total_requests == reference_requests  # no request sent twice
    got = read_parts(out).sort_values(KEY).reset_index(drop=True)
    assert got.equals(expected)


SCRIPT = """\
import sys
from nemocc_dask import LLMConfig, run_to_parquet
from nemocc_dask.errors import Preempted
try:
    run_to_parquet(sys.argv[1], sys.argv[2], "distill",
                   LLMConfig(base_url=sys.argv[3], model="mock", max_in_flight=8),
                   rows_per_partition=20, show_progress=False)
except Preempted as exc:
    print(exc, file=sys.stderr)
    sys.exit(75)
"""


def test_sigterm_without_a_cluster_drains_too(tmp_path, cluster_client):
    """A Python script that runs without a Dask cluster (the local threaded scheduler): SIGTERM
    raises Preempted after the answers on the wire are journaled, and the rerun resumes."""
    docs = _docs(tmp_path, 120)
    expected, reference_requests = _reference(tmp_path, docs, cluster_client)
    out = tmp_path / "out"
    with MockLLMServer(latency=0.5) as server:
        args = [sys.executable, "-c", SCRIPT, str(docs), str(out), server.base_url]
        _sigterm_mid_run(args, out, server)
        done = subprocess.run(args, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        total_requests = server.stats.requests
    assert total_requests == reference_requests  # no request sent twice
    assert read_parts(out).sort_values(KEY).reset_index(drop=True).equals(expected)


SBATCH = """\
#!/bin/bash
#SBATCH --job-name=nemocc-preempt
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --cpus-per-task=2
# As examples/sbatch_run.sh: the driver runs in the background so that the batch shell can
# forward SIGTERM to it, and a clean stop (exit 75) requeues the job.
{command} &
DRIVER=$!
trap 'kill -TERM "$DRIVER" 2>/dev/null' TERM
while :; do status=0; wait "$DRIVER" || status=$?; kill -0 "$DRIVER" 2>/dev/null || break; done
echo "driver exit $status restart ${{SLURM_RESTART_COUNT:-0}}"
if [ "$status" -eq 75 ]; then scontrol requeue "$SLURM_JOB_ID"; fi
exit "$status"
"""


@slurm_test(timeout=600)
def test_slurm_job_signalled_mid_run_is_requeued_and_finishes(tmp_path, cluster_client):
    docs = _docs(tmp_path, 120)
    expected, reference_requests = _reference(tmp_path, docs, cluster_client)
    out, log = tmp_path / "out", tmp_path / "job.log"
    with MockLLMServer(latency=0.5) as server:
        command = " ".join([sys.executable, "-m", "nemocc_dask.cli",
                            *_run_args(docs, out, server), "--workers", "1",
                            "--threads-per-worker", "4"])
        script = tmp_path / "job.sh"
        script.write_text(SBATCH.format(command=command))
        job = subprocess.run(["sbatch", "--parsable", f"--output={log}", f"--chdir={tmp_path}",
                              str(script)], capture_output=True, text=True, check=True,
                             env=os.environ).stdout.strip().split(";")[0]
        try:
            _wait_for_answers(out, 24, timeout=180, log=log)
            subprocess.run(["scancel", "--signal=TERM", "--batch", job], check=True)
            # SLURM starts a requeued job again once its old credential expired (AuthInfo
            # cred_expire: 120 s by default, 15 s in .ci/slurm_setup.sh)
            deadline = time.time() + 400
            while time.time() < deadline and "restart 1" not in _read(log):
                time.sleep(1)
        finally:
            subprocess.run(["scancel", job], capture_output=True)
        total_requests = server.stats.requests
    text = _read(log)
    assert "driver exit 75 restart 0" in text, text[-3000:]
    assert "driver exit 0 restart 1" in text, text[-3000:]
    assert total_requests == reference_requests  # nothing paid twice
    got = read_parts(out).sort_values(KEY).reset_index(drop=True)
    assert got.equals(expected)


def _read(path: Path) -> str:
    return path.read_text() if path.exists() else ""
