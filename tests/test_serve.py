"""Served models: the run starts a real server process next to each worker (the mock, through its
command line: nothing here imports it), sends each worker's requests to its own server, restarts
one that dies, stops them all at the end, and refuses to start when a server cannot."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid

import pandas as pd
import pytest
from conftest import make_docs

from nemocc_dask import LLMConfig, run_to_parquet
from nemocc_dask.errors import StartError
from nemocc_dask.serve import ServeError, ServeSpec, served_status
from nemocc_dask.testing import MockLLMServer

MOCK = f"{sys.executable} -m nemocc_dask.cli serve-mock --host {{host}} --port {{port}}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as fh:  # a zombie is not alive
        return fh.read().split()[2] != "Z"


def _parts(folder) -> pd.DataFrame:
    return pd.read_parquet(folder / "parts").sort_values(["id", "segment_id"]).reset_index(
        drop=True)


def _run_in_thread(path, out, llm, outcome):
    def run():
        outcome["report"] = run_to_parquet(path, out, "knowledge_list", llm, show_progress=False,
                                           rows_per_partition=10)

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.monotonic() + 60  # until answers are being journaled
    while time.monotonic() < deadline and not list((out / "journal").glob("*")):
        time.sleep(0.2)
    time.sleep(1)
    return thread


def test_presets_expand_to_a_command_health_path_and_model():
    spec = ServeSpec.parse("vllm:'/models/llama 3'", startup_timeout=60)
    assert spec.command == "vllm serve '/models/llama 3' --host {host} --port {port}"
    assert spec.health == "/health" and spec.model == "/models/llama 3"
    assert LLMConfig(serve=spec).model == "/models/llama 3"
    spec = ServeSpec.parse("vllm:/models/llama --max-num-seqs 512 --tensor-parallel-size 2")
    assert spec.model == "/models/llama" and spec.command == (
        "vllm serve /models/llama --host {host} --port {port} --max-num-seqs 512 "
        "--tensor-parallel-size 2")
    assert ServeSpec.parse("llamacpp:m.gguf").command.startswith("llama-server -m m.gguf")
    # llama.cpp: no busy polling, the worker's CPU share; the user's arguments come last (win)
    argv = ServeSpec.parse("llamacpp:m.gguf --threads 1").argv("127.0.0.1", 9, "", threads=3)
    assert " ".join(argv).endswith("--poll 0 --threads 3 --threads-batch 3 --threads 1")
    with pytest.raises(ValueError, match=r"\{port\}"):
        ServeSpec("vllm serve /models/llama")


def test_every_backend_is_one_class_behind_one_interface():
    """Issue 25: each server program says its command, health path and context option in one
    class; a spec made from a preset carries its backend, a command template is ``command``."""
    from nemocc_dask.serve.backends import BACKENDS, Backend, backend

    assert set(BACKENDS) == {"vllm", "sglang", "llamacpp"}
    for name, program in BACKENDS.items():
        assert isinstance(program, Backend) and program.name == name
        spec = ServeSpec.parse(f"{name}:/models/m --extra 1")
        assert (spec.backend, spec.health, spec.model) == (name, program.health, "/models/m")
        assert "{port}" in spec.command and spec.command.endswith("--extra 1")
        assert program.context_option and f"{program.context_option} 4096" in \
            program.context_hint(4096)
    own = ServeSpec("my-server --port {port}")
    assert (own.backend, own.health) == ("command", "/v1/models")
    hint = backend(own.backend).context_hint(4096)  # a template: every program's option
    assert all(f"{b.context_option} 4096" in hint for b in BACKENDS.values())
    assert ServeSpec.parse("vllm:/m", health="/ready").health == "/ready"


class _Lifecycle:
    """A stand-in lifecycle for the shared loop: down for ``down_for`` checks, may restart
    ``may`` times."""

    url = "http://127.0.0.1:1/v1"

    def __init__(self, down_for: int, may: int):
        self.down_for, self.may, self.calls = down_for, may, []

    async def down(self):
        self.calls.append("down")
        self.down_for -= 1
        return "exited" if self.down_for >= 0 else None

    async def restart(self, why):
        self.calls.append(f"restart:{why}")
        self.may -= 1
        return self.may >= 0

    async def wait_healthy(self):
        self.calls.append("wait")
        raise ServeError("did not come up")  # left to the next check


def test_the_shared_loop_restarts_what_is_down_only_when_its_lifecycle_may():
    import asyncio

    from nemocc_dask.serve.supervision import supervise_once

    up, restartable, spent = _Lifecycle(0, 1), _Lifecycle(2, 1), _Lifecycle(1, 0)
    for server in (up, restartable, spent):
        for _ in range(2):
            asyncio.run(supervise_once(server))
    assert up.calls == ["down", "down"]
    assert restartable.calls == ["down", "restart:exited", "wait", "down", "restart:exited"]
    assert spent.calls == ["down", "restart:exited", "down"]


def test_health_watch_calls_a_server_down_after_failures_in_a_row(nemocc_config):
    from nemocc_dask.serve.supervision import HealthWatch

    nemocc_config({"serve.health-failures-before-restart": 3})
    watch = HealthWatch()
    assert [watch.saw(ok) for ok in (False, False, True, False, False, False)] == \
        [False, False, False, False, False, True]


@pytest.mark.slow
def test_each_worker_serves_and_uses_its_own_server_and_none_is_left(tmp_path, cluster_client):
    path = tmp_path / "docs.parquet"
    make_docs(80).to_parquet(path)
    spec = ServeSpec(MOCK + " --latency 0.01", startup_timeout=60)
    report = run_to_parquet(path, tmp_path / "served", "knowledge_list",
                            LLMConfig(model="mock", serve=spec), show_progress=False,
                            rows_per_partition=10)
    servers = report["served"]["servers"]
    assert len({s["url"] for s in servers}) == 2 and report["served"]["restarts"] == 0
    per_server = {url: sum(i["req_per_s"] for i in series)
                  for url, series in report["endpoint_series"].items()}
    assert set(per_server) == {s["url"] for s in servers} and all(per_server.values())
    assert not any(_alive(pid) for s in servers for pid in s["pids"])
    assert all(os.path.getsize(s["log"]) > 0 for s in servers)
    assert str(tmp_path / "served" / "serve-logs") in servers[0]["log"]

    with MockLLMServer(latency=0.01, tokenizer="bundled") as external:  # as serve-mock
        run_to_parquet(path, tmp_path / "external", "knowledge_list",
                       LLMConfig(base_url=external.base_url, model="mock"), show_progress=False,
                       rows_per_partition=10)
    pd.testing.assert_frame_equal(_parts(tmp_path / "served"), _parts(tmp_path / "external"))


@pytest.mark.slow
def test_a_server_killed_mid_run_is_restarted_and_nothing_is_lost(tmp_path, cluster_client):
    path = tmp_path / "docs.parquet"
    make_docs(120).to_parquet(path)
    spec = ServeSpec(MOCK + " --latency 0.3", startup_timeout=60)
    outcome = {}
    thread = _run_in_thread(path, tmp_path / "out", LLMConfig(model="mock", serve=spec,
                                                             backoff_base=0.2), outcome)
    servers = [s for per in cluster_client.run(served_status).values() for s in per]
    os.kill(servers[0]["pids"][-1], signal.SIGKILL)
    thread.join(300)
    report = outcome["report"]
    assert report["served"]["restarts"] >= 1 and report["accounted"]
    assert report["failed_requests"] == 0 and not report["failed_by_class"]
    assert not any(_alive(pid) for s in report["served"]["servers"] for pid in s["pids"])


@pytest.mark.slow
def test_per_node_the_workers_share_one_server_restarted_once_when_killed(tmp_path,
                                                                          cluster_client):
    """--serve-per node: the two workers of the LocalCluster (one node) share one server; when
    it is killed, exactly one of them restarts it (same URL) and nothing is lost; the last
    worker to leave stops it."""
    path = tmp_path / "docs.parquet"
    make_docs(120).to_parquet(path)
    spec = ServeSpec(MOCK + " --latency 0.3", startup_timeout=60, per="node")
    outcome = {}
    thread = _run_in_thread(path, tmp_path / "out", LLMConfig(model="mock", serve=spec,
                                                             backoff_base=0.2), outcome)
    seen = [s for per in cluster_client.run(served_status).values() for s in per]
    assert len(seen) == 2 and len({s["url"] for s in seen}) == 1  # both workers, one server
    assert seen[0]["pids"] == seen[1]["pids"] and len(seen[0]["pids"]) == 1
    os.kill(seen[0]["pids"][0], signal.SIGKILL)
    thread.join(300)
    report = outcome["report"]
    servers = report["served"]["servers"]
    assert len(servers) == 1 and servers[0]["url"] == seen[0]["url"]
    assert report["served"]["restarts"] == 1 and len(servers[0]["pids"]) == 2
    assert servers[0]["workers"] == 2 and report["accounted"]
    assert report["failed_requests"] == 0 and not report["failed_by_class"]
    assert list(report["endpoint_series"]) == [servers[0]["url"]]
    assert not any(_alive(pid) for pid in servers[0]["pids"])
    assert [p.name for p in (tmp_path / "out" / "serve-logs").iterdir()] == [
        os.path.basename(servers[0]["log"])]


@pytest.mark.slow
def test_the_full_pipeline_runs_all_five_tasks_against_the_same_servers(tmp_path,
                                                                       cluster_client):
    """run_nemotron_cc_to_parquet with a served model: one server per worker, started once for
    all five tasks (the model loads once), each task's report lists the same servers."""
    from nemocc_dask import run_nemotron_cc_to_parquet

    path = tmp_path / "docs.parquet"
    make_docs(40).to_parquet(path)
    spec = ServeSpec(MOCK + " --latency 0.01", startup_timeout=60)
    reports = run_nemotron_cc_to_parquet(path, tmp_path / "out", LLMConfig(model="mock",
                                                                          serve=spec),
                                         show_progress=False, rows_per_partition=10)
    assert len(reports) == 5 and all(r["accounted"] and r["requests"] for r in reports.values())
    served = [r["served"]["servers"] for r in reports.values()]
    assert all(s == served[0] for s in served) and len(served[0]) == 2
    assert all(len(s["pids"]) == 1 for s in served[0])  # each started once
    logs = list((tmp_path / "out" / "serve-logs").iterdir())
    assert len(logs) == 2 and all(log.read_text().count("starting:") == 1 for log in logs)
    assert not any(_alive(s["pids"][0]) for s in served[0])


@pytest.mark.slow
def test_a_slow_server_start_is_reported_while_the_run_waits(tmp_path, cluster_client,
                                                             nemocc_config, caplog):
    """Loading a model takes minutes: the driver says it is still waiting, and for how long."""
    nemocc_config({"serve.waiting-log-seconds": 0.5})
    path = tmp_path / "docs.parquet"
    make_docs(10).to_parquet(path)
    slow = f"sh -c 'sleep 2; exec {MOCK}'"
    with caplog.at_level("INFO", logger="nemocc_dask.serve"):
        report = run_to_parquet(path, tmp_path / "out", "knowledge_list",
                                LLMConfig(model="mock", serve=ServeSpec(slow, startup_timeout=60)),
                                show_progress=False)
    assert report["accounted"] and report["failed_requests"] == 0
    waiting = [r.getMessage() for r in caplog.records if "still waiting" in r.getMessage()]
    assert len(waiting) >= 2 and "/v1/models" in waiting[0] and "of 60 s" in waiting[0]
    assert str(tmp_path / "out" / "serve-logs") in waiting[0]


@pytest.mark.slow
def test_a_server_that_exits_at_once_stops_the_run_before_any_request(tmp_path, cluster_client):
    path = tmp_path / "docs.parquet"
    make_docs(10).to_parquet(path)
    crash = (f"{sys.executable} -c \"import sys; print('CUDA error: out of memory'); "
             "sys.exit(3)\" {port}")
    with pytest.raises(ServeError, match="(?s)exited with status 3.*CUDA error: out of memory"):
        run_to_parquet(path, tmp_path / "out", "knowledge_list",
                       LLMConfig(model="mock", serve=ServeSpec(crash)), show_progress=False)
    assert not (tmp_path / "out" / "parts").exists()


@pytest.mark.slow
def test_cli_command_not_found_is_exit_2_with_the_fix(tmp_path):
    make_docs(5).to_parquet(tmp_path / "docs.parquet")
    done = subprocess.run(
        [sys.executable, "-m", "nemocc_dask.cli", "run", "--task", "knowledge_list", "--input",
         str(tmp_path / "docs.parquet"), "--output", str(tmp_path / "out"),
         "--serve", "no-such-inference-server --port {port}", "--model", "m", "--workers", "1"],
        capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "'no-such-inference-server' was not found on PATH" in done.stderr


def _served_run(tmp_path, task: str, mock_options: str, model: str, workers: int) -> list[str]:
    """The CLI command of a run over ``tmp_path/docs.parquet`` that serves the mock itself."""
    return [sys.executable, "-m", "nemocc_dask.cli", "run", "--task", task, "--input",
            str(tmp_path / "docs.parquet"), "--output", str(tmp_path / "out"), "--serve",
            f"{MOCK} {mock_options}", "--model", model, "--workers", str(workers),
            "--no-progress"]


@pytest.mark.slow
@pytest.mark.parametrize("stop, status", [(signal.SIGTERM, 75), (signal.SIGINT, 130)])
def test_cli_sigterm_or_ctrl_c_stops_the_run_and_every_server(tmp_path, stop, status):
    """Issue 28 item 5: SIGTERM, or Ctrl-C sent to the whole process group as a terminal does,
    ends with one short message that says how many of the requests in flight were kept (no
    worker tracebacks), and no server is left running."""
    make_docs(200).to_parquet(tmp_path / "docs.parquet")
    marker = f"served-{uuid.uuid4().hex[:8]}"
    proc = subprocess.Popen(
        _served_run(tmp_path, "knowledge_list", f"--latency 0.5 --model {marker}", marker, 2),
        stderr=subprocess.PIPE, text=True, start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as in a terminal
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not any(
            p.stat().st_size for p in (tmp_path / "out" / "journal").glob("*")):
        time.sleep(0.5)  # answers are arriving: requests are in flight
    pattern = rf"serve-mock --host [0-9.]+ --port [0-9]+ --latency 0.5 --model {marker}"
    servers = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout
    assert len(servers.split()) == 2  # the servers, not the driver (its command has {port})
    os.killpg(proc.pid, stop) if stop == signal.SIGINT else proc.send_signal(stop)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == status, err
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 3, err
    last = err.strip().splitlines()[-1]
    assert re.fullmatch(r"stopped: (SIGTERM|Ctrl-C): \d+ of \d+ partitions finished; of the \d+ "
                        r"requests in flight, \d+ were answered and journaled.*resume", last), last
    assert subprocess.run(["pgrep", "-f", pattern], capture_output=True).returncode == 1


def test_serving_without_a_cluster_says_how_to_get_one(tmp_path, monkeypatch):
    from nemocc_dask.run import start

    monkeypatch.setattr(start, "distributed_client", lambda: None)
    make_docs(5).to_parquet(tmp_path / "docs.parquet")
    with pytest.raises(StartError, match="needs a Dask cluster"):
        run_to_parquet(tmp_path / "docs.parquet", tmp_path / "out", "knowledge_list",
                       LLMConfig(model="m", serve=ServeSpec(MOCK)), show_progress=False)


from test_cluster import slurm_test  # noqa: E402  (the SLURM marks, shared with those tests)


@pytest.mark.parametrize("per, n_servers", [("worker", 2), ("node", 1)])
@slurm_test(timeout=400)
def test_slurm_workers_serve_the_model_and_stop_it(tmp_path, per, n_servers):
    """On the single-node slurmctld, two worker jobs: per worker, each starts its own server;
    per node, they share one. Every server serves requests; none is left after the run."""
    from nemocc_dask.run.cluster import make_client

    path = tmp_path / "docs.parquet"
    make_docs(60).to_parquet(path)
    client = make_client("slurm", queue="debug", cores=1, memory="2GB", walltime="00:10:00",
                         jobs=2, interface="lo", log_directory=str(tmp_path / "logs"),
                         scheduler_options={"host": "127.0.0.1", "dashboard_address": None})
    try:
        client.wait_for_workers(2, timeout=120)
        report = run_to_parquet(path, tmp_path / "out", "knowledge_list",
                                LLMConfig(model="mock", serve=ServeSpec(
                                    MOCK + " --latency 0.01", startup_timeout=120, per=per)),
                                rows_per_partition=10, show_progress=False)
    finally:
        cluster = client.cluster
        client.close()
        cluster.close()
    servers = report["served"]["servers"]
    assert report["accounted"] and len({s["url"] for s in servers}) == n_servers
    assert all(sum(i["req_per_s"] for i in series)
               for series in report["endpoint_series"].values())
    assert set(report["endpoint_series"]) == {s["url"] for s in servers}
    assert not any(_alive(pid) for s in servers for pid in s["pids"])


@pytest.mark.slow
def test_a_node_server_outlives_the_worker_that_started_it_while_others_use_it(tmp_path):
    """Two workers of one process (a threaded cluster) share the node's server: the starter
    leaves, the server keeps serving the other; when it dies (as it does with its starting
    worker's process) the other restarts it without counting a restart; the last one to leave
    stops it and clears the meeting folder."""
    import asyncio

    from nemocc_dask.serve.node import NodeServer, meeting_folder
    from nemocc_dask.serve.supervision import supervise_once

    spec = ServeSpec(MOCK, startup_timeout=60, per="node", max_restarts=0)
    folder = meeting_folder(f"tcp://test-{uuid.uuid4().hex}", spec)
    first, second = (NodeServer(spec, "127.0.0.1", folder, tmp_path / "node.log",
                                f"{os.getpid()}-{name}") for name in ("a", "b"))

    async def scenario():
        await first.join()
        await second.join()
        assert first.url == second.url and first.status()["workers"] == 2
        pid = first.status()["pids"][0]
        first.leave()
        assert _alive(pid) and second.status()["workers"] == 1
        os.kill(pid, signal.SIGKILL)
        while second.status()["pids"] == [pid]:
            await supervise_once(second)
        await supervise_once(second)
        assert second._healthy() and second.status()["restarts"] == 0
        return second.status()["pids"]

    pids = asyncio.run(scenario())
    assert len(pids) == 2 and _alive(pids[1])
    second.leave()
    assert not any(_alive(pid) for pid in pids) and not folder.exists()


@pytest.mark.slow
def test_node_server_supervision_never_blocks_the_workers_event_loop(tmp_path):
    """While another worker holds the node's lock (here: 2 s) and the server must be restarted,
    the supervising worker's event loop keeps running (its heartbeats, its budget reports)."""
    import asyncio
    import fcntl

    from nemocc_dask.serve.node import NodeServer, meeting_folder
    from nemocc_dask.serve.supervision import supervise_once

    spec = ServeSpec(MOCK, startup_timeout=60, per="node")
    folder = meeting_folder(f"tcp://test-{uuid.uuid4().hex}", spec)
    worker = NodeServer(spec, "127.0.0.1", folder, tmp_path / "node.log", f"{os.getpid()}-a")

    def hold_the_lock(seconds: float) -> None:
        with open(folder / "lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            time.sleep(seconds)

    async def scenario():
        await worker.join()
        pid = worker.status()["pids"][0]
        os.kill(pid, signal.SIGKILL)
        holder = threading.Thread(target=hold_the_lock, args=(2.0,))
        holder.start()
        await asyncio.sleep(0.2)  # the other worker has the lock now
        gaps, last = [], time.monotonic()

        async def ticker():
            nonlocal last
            while True:
                await asyncio.sleep(0.05)
                gaps.append(time.monotonic() - last)
                last = time.monotonic()

        ticking = asyncio.ensure_future(ticker())
        await supervise_once(worker)
        ticking.cancel()
        holder.join()
        return pid, max(gaps), worker.status()["pids"]

    pid, longest_gap, pids = asyncio.run(scenario())
    try:
        assert pids[-1] != pid and _alive(pids[-1])  # restarted once the lock was free
        assert longest_gap < 0.5, longest_gap  # the loop never waited on the lock or the kill
    finally:
        worker.leave()


@pytest.mark.slow
@pytest.mark.parametrize("why", ["another run's folder", "a locked folder"])
def test_a_refused_served_run_starts_no_server_and_leaves_the_folder_as_it_was(tmp_path, why):
    """Issue 23 item 5: the folder checks come before the served model starts, so a refusal
    writes no serve-logs/ and starts no server (with vLLM: no minutes of model loading)."""
    make_docs(5).to_parquet(tmp_path / "docs.parquet")
    out = tmp_path / "out"
    marker = f"served-{uuid.uuid4().hex[:8]}"
    with MockLLMServer() as server:
        first = subprocess.run(
            [sys.executable, "-m", "nemocc_dask.cli", "run", "--task", "distill", "--input",
             str(tmp_path / "docs.parquet"), "--output", str(out), "--base-url",
             server.base_url, "--model", "mock", "--workers", "1", "--no-progress"],
            capture_output=True, text=True, timeout=300)
    if why == "a locked folder":
        holder = subprocess.Popen(["sleep", "60"])
        (out / ".nemocc.lock").write_text(json.dumps(
            {"host": socket.gethostname(), "pid": holder.pid, "heartbeat": time.time()}))
    before = {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    try:
        refused = subprocess.run(
            [sys.executable, "-m", "nemocc_dask.cli", "run", "--task", "knowledge_list"
             if why == "another run's folder" else "distill", "--input",
             str(tmp_path / "docs.parquet"), "--output", str(out), "--serve",
             MOCK + f" --model {marker}", "--model", marker, "--workers", "1", "--no-progress"],
            capture_output=True, text=True, timeout=300)
    finally:
        if why == "a locked folder":
            holder.kill()
    after = {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert first.returncode == 0, first.stderr
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert ("holds a run with different" if why == "another run's folder"
            else "being written by another run") in refused.stderr
    assert "served model up" not in refused.stderr and not (out / "serve-logs").exists()
    assert after == before
    pattern = rf"serve-mock --host [0-9.]+ --port [0-9]+ --model {marker}"
    assert subprocess.run(["pgrep", "-f", pattern], capture_output=True).returncode == 1


@pytest.mark.slow
def test_a_served_model_with_too_small_a_context_is_refused_with_the_number(tmp_path):
    """Issue 28 item 2: with --serve the command is ours to fix: a context smaller than the task
    needs is exit 2 saying how much (not a run that rejects most rows as prompt_too_long), and
    the server started to find out is stopped."""
    make_docs(10).to_parquet(tmp_path / "docs.parquet")
    marker = f"small-{uuid.uuid4().hex[:8]}"
    done = subprocess.run(
        _served_run(tmp_path, "distill", f"--max-model-len 2000 --model {marker}", marker, 1),
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "task distill needs a context of 3600 tokens" in done.stderr
    assert "has 2000" in done.stderr and "-c 3600" in done.stderr
    assert not (tmp_path / "out" / "parts").exists()
    left = subprocess.run(["pgrep", "-f", f"serve-mock .*{marker}"], capture_output=True)
    assert left.returncode == 1
