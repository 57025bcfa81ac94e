"""Cluster helper: config defaults, clear errors, and a real SLURM run where slurmctld exists."""

import shutil
import subprocess
import time

import dask
import pandas as pd
import pytest

from nemocc_dask.run.cluster import ClusterError, make_client


def test_defaults_registered_in_dask_config():
    assert dask.config.get("nemocc.slurm.walltime") == "04:00:00"
    assert dask.config.get("nemocc.local.workers") == 2
    with dask.config.set({"nemocc.slurm.queue": "gpu"}):
        assert dask.config.get("nemocc.slurm.queue") == "gpu"


def test_unknown_cluster_kind():
    with pytest.raises(ClusterError, match="choose local, local-cuda or slurm"):
        make_client("kubernetes")


def test_slurm_job_script_has_options():
    from nemocc_dask.run.cluster import slurm_cluster

    cluster = slurm_cluster(queue="debug", account="proj", walltime="00:05:00", jobs=0,
                            job_extra_directives=["--gres=gpu:1"],
                            scheduler_options={"host": "127.0.0.1", "dashboard_address": None})
    try:
        script = cluster.job_script()
    finally:
        cluster.close()
    for expected in ("#SBATCH -p debug", "#SBATCH -A proj", "#SBATCH -t 00:05:00",
                     "#SBATCH --gres=gpu:1"):
        assert expected in script


def _slurm_running() -> bool:
    if shutil.which("sbatch") is None:
        return False
    try:
        return subprocess.run(["sinfo", "-h"], capture_output=True, timeout=10).returncode == 0
    except Exception:
        return False


def slurm_test(timeout: int = 300):
    """The marks of a test that needs sbatch and a running slurmctld (.ci/slurm_setup.sh)."""
    marks = (pytest.mark.slow, pytest.mark.slurm, pytest.mark.timeout(timeout),
             pytest.mark.skipif(not _slurm_running(), reason="sbatch/slurmctld not available "
                                "(start one with .ci/slurm_setup.sh)"))

    def apply(fn):
        for mark in marks:
            fn = mark(fn)
        return fn

    return apply


@slurm_test()
def test_pipeline_on_slurm_workers(tmp_path):
    from conftest import make_docs

    from nemocc_dask import LLMConfig
    from nemocc_dask.run.runner import run_to_parquet
    from nemocc_dask.testing.mock import MockLLMServer

    path = tmp_path / "docs.parquet"
    make_docs(20).to_parquet(path, row_group_size=10)
    client = make_client("slurm", queue="debug", cores=1, memory="2GB", walltime="00:10:00",
                         jobs=2, interface="lo", log_directory=str(tmp_path / "logs"),
                         scheduler_options={"host": "127.0.0.1", "dashboard_address": None})
    try:
        client.wait_for_workers(2, timeout=120)
        with MockLLMServer() as server:
            report = run_to_parquet(path, tmp_path / "out", "knowledge_list",
                                    LLMConfig(base_url=server.base_url, model="mock"),
                                    rows_per_partition=10, show_progress=False)
        job_ids = set(client.run(lambda: __import__("os").environ.get("SLURM_JOB_ID")).values())
    finally:
        cluster = client.cluster
        client.close()
        cluster.close()
    assert report["documents_in"] == 20 and report["accounted"] and report["rows_written"] > 0
    assert len(job_ids) == 2 and None not in job_ids
    parts = pd.concat(pd.read_parquet(f) for f in (tmp_path / "out" / "parts").glob("*.parquet"))
    assert len(parts) == report["rows_written"]
    for _ in range(30):
        queued = subprocess.run(["squeue", "-h", "-j", ",".join(job_ids)], capture_output=True,
                                text=True).stdout.strip()
        if not queued:
            break
        time.sleep(1)
    assert not queued, f"SLURM jobs still queued: {queued}"


def test_adapt_spec_is_checked():
    from nemocc_dask.run.cluster import parse_adapt

    assert parse_adapt("1:8") == (1, 8)
    for bad in ("8", "a:b", "5:2", "0:0"):
        with pytest.raises(ClusterError, match="MIN:MAX"):
            parse_adapt(bad)


def test_adapt_without_slurm_is_refused(tmp_path, capsys):
    from nemocc_dask.cli import main

    code = main(["run", "--task", "distill", "--input", str(tmp_path), "--output",
                 str(tmp_path / "out"), "--base-url", "http://127.0.0.1:1/v1", "--model", "m",
                 "--adapt", "1:4"])
    assert code == 2 and "--cluster slurm" in capsys.readouterr().err


def test_a_scheduler_without_workers_is_a_clear_error():
    from distributed import LocalCluster

    with LocalCluster(n_workers=0, dashboard_address=None) as cluster:
        with dask.config.set({"nemocc.worker-start-timeout": 1}):
            started = time.monotonic()
            with pytest.raises(ClusterError, match="no Dask worker joined within 1 s"):
                make_client(scheduler=cluster.scheduler_address)
    assert time.monotonic() - started < 30


@slurm_test()
def test_adaptive_slurm_cluster_runs_under_the_budget(tmp_path):
    """--adapt 1:2: the run waits for the first worker job, the cluster may grow to two, the
    endpoint never sees more than the budget, and every job is gone afterwards."""
    from conftest import make_docs

    from nemocc_dask import LLMConfig
    from nemocc_dask.run.runner import run_to_parquet
    from nemocc_dask.testing.mock import MockLLMServer

    path = tmp_path / "docs.parquet"
    make_docs(80, paragraphs=1).to_parquet(path)
    client = make_client("slurm", adapt="1:2", queue="debug", cores=1, memory="2GB",
                         walltime="00:10:00", interface="lo",
                         log_directory=str(tmp_path / "logs"),
                         scheduler_options={"host": "127.0.0.1", "dashboard_address": None})
    try:
        assert len(client.scheduler_info(n_workers=-1)["workers"]) >= 1  # waited for one
        with MockLLMServer(latency=0.2, track_in_flight=True) as server:
            report = run_to_parquet(path, tmp_path / "out", "distill",
                                    LLMConfig(base_url=server.base_url, model="mock",
                                              max_in_flight=6),
                                    rows_per_partition=10, show_progress=False)
    finally:
        cluster = client.cluster
        client.close()
        cluster.close()
    assert report["accounted"] and report["documents_in"] == 80
    assert server.stats.max_in_flight <= 6
    for _ in range(30):
        queued = subprocess.run(["squeue", "-h", "-n", "dask-worker"], capture_output=True,
                                text=True).stdout.strip()
        if not queued:
            break
        time.sleep(1)
    assert not queued, f"SLURM worker jobs still queued: {queued}"


def test_the_local_clusters_dashboard_and_scheduler_listen_on_loopback_only():
    """Issue 24 item 10: the dashboard is unauthenticated; the CLI's LocalCluster must not offer
    it (or the scheduler) on every interface."""
    import psutil

    from nemocc_dask.run.cluster import make_client

    client = make_client("local", workers=1, threads_per_worker=1)
    try:
        scheduler = client.cluster.scheduler
        ports = {scheduler.port, scheduler.services["dashboard"].port}
        listening = [c for c in psutil.net_connections("tcp")
                     if c.status == psutil.CONN_LISTEN and c.laddr.port in ports]
        assert {c.laddr.port for c in listening} == ports
        assert all(c.laddr.ip == "127.0.0.1" for c in listening), listening
    finally:
        cluster = client.cluster
        client.close()
        cluster.close()
