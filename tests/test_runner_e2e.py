"""Lossless, resumable runs: kill and resume, a lost worker, bad inputs, secrets, the report."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import make_docs

from nemocc_dask import LLMConfig
from nemocc_dask.io import InputError
from nemocc_dask.run.runner import OutputError, run_to_parquet
from nemocc_dask.testing.mock import MockLLMServer

pytestmark = pytest.mark.slow


def read_parts(out: Path) -> pd.DataFrame:
    files = sorted((out / "parts").glob("*.parquet"))
    return pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)


def assert_report_adds_up(report: dict) -> None:
    assert report["accounted"]
    assert report["documents_written"] + sum(report["documents_not_written"].values()) == \
        report["documents_in"]


def cli(*args, env=None):
    return [sys.executable, "-m", "nemocc_dask.cli", *args]


def test_run_writes_layout_and_report(tmp_path, docs_parquet, cluster_client):
    out = tmp_path / "out"
    with MockLLMServer(latency=0.01) as server:
        llm = LLMConfig(base_url=server.base_url, model="mock", max_in_flight=16)
        report = run_to_parquet(docs_parquet, out, "diverse_qa", llm, rows_per_partition=20,
                                show_progress=False)
        requests_first = server.stats.requests
        again = run_to_parquet(docs_parquet, out, "diverse_qa", llm, rows_per_partition=20,
                               show_progress=False)
    assert sorted(p.name for p in (out / "parts").iterdir()) == \
        ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert (out / "report.json").exists() and (out / "run.json").exists()
    assert report["documents_in"] == 60 and report["rows_written"] == len(read_parts(out))
    assert_report_adds_up(report)
    assert server.stats.requests == requests_first  # the rerun skipped every partition
    assert again["partitions_skipped"] == 3 and again["rows_written"] == report["rows_written"]
    rejects = pd.concat([pd.read_parquet(f) for f in (out / "rejects").glob("*.parquet")])
    assert set(rejects["reject_reason"]) <= {"truncated", "too_long", "empty_parse", "too_short",
                                             "llm_error"}
    assert sum(report["rows_rejected"].values()) == len(rejects)
    from nemocc_dask.recipe.stages.preprocess import PREPROCESS_STAGES

    stages = report["stage_seconds"]
    assert set(stages) == {*PREPROCESS_STAGES, "generate", "postprocess"}
    assert all(t >= 0 for t in stages.values())
    assert stages["generate"] >= 0.01  # at least one round of 10 ms mock answers per partition


def test_kill_and_resume_matches_uninterrupted_run(tmp_path, docs_parquet):
    with MockLLMServer(latency=0.3) as server:
        base = ["run", "--task", "knowledge_list", "--input", str(docs_parquet),
                "--base-url", server.base_url, "--model", "mock", "--max-in-flight", "4",
                "--workers", "1", "--threads-per-worker", "2", "--rows-per-partition", "10",
                "--no-progress"]
        reference = tmp_path / "reference"
        subprocess.run(cli(*base, "--output", str(reference)), check=True, capture_output=True,
                       timeout=300)
        out = tmp_path / "out"
        proc = subprocess.Popen(cli(*base, "--output", str(out)), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.time() + 120
        while time.time() < deadline and answers_so_far(out) < 20:
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        answered = answers_so_far(out)
        assert len(list((out / "parts").glob("*.parquet"))) < 6  # the kill landed mid-run
        total_rows = 60
        before = server.stats.requests
        subprocess.run(cli(*base, "--output", str(out)), check=True, capture_output=True,
                       timeout=300)
        rerun_requests = server.stats.requests - before
    assert answered >= 20
    assert rerun_requests <= total_rows - answered + 4
    key = ["id", "segment_id"]
    got = read_parts(out).sort_values(key).reset_index(drop=True)
    expected = read_parts(reference).sort_values(key).reset_index(drop=True)
    assert not got.duplicated(key).any()
    pd.testing.assert_frame_equal(got, expected)
    assert_report_adds_up(json.loads((out / "report.json").read_text()))


def answers_so_far(out: Path) -> int:
    """Answers a run has kept: journal lines of unfinished partitions plus the requests of
    finished ones (whose journals are removed)."""
    journals = sum(len(j.read_bytes().splitlines()) for j in out.glob("journal/*.jsonl"))
    finished = sum(json.loads(s.read_text())["requests"] for s in out.glob("stats/*.json")
                   if (out / "parts" / f"{s.stem}.parquet").exists())
    return journals + finished


def partition_mid_way(out: Path, at_most: int = 6) -> int | None:
    """An open partition with 1..``at_most`` journaled answers (its number), or None."""
    for journal in out.glob("journal/*.jsonl"):
        if 1 <= len(journal.read_bytes().splitlines()) <= at_most:
            return int(journal.stem.split("-")[1])
    return None


def worker_of(client, index: int) -> str | None:
    """The address of the worker processing partition ``index`` now."""
    for address, keys in client.processing().items():
        if any(str(key).split("-")[-2:-1] == [str(index)] for key in keys):
            return address
    return None


def test_lost_worker_loses_nothing(tmp_path, docs_parquet):
    import threading

    from distributed import Client, LocalCluster

    out = tmp_path / "out"
    with LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None) as cluster, \
            Client(cluster) as client, MockLLMServer(latency=0.2) as server:
        llm = LLMConfig(base_url=server.base_url, model="mock", max_in_flight=4)
        reference = run_to_parquet(docs_parquet, tmp_path / "reference", "knowledge_list", llm,
                                   rows_per_partition=10, show_progress=False)
        at_kill = {}

        def kill_one_worker():
            pids = client.run(os.getpid)
            deadline = time.time() + 60
            address = None
            # a partition with journaled answers (the killed attempt paid for some), not near
            # its end (it cannot finish before the kill lands): kill the worker running it
            while time.time() < deadline and address is None:
                index = partition_mid_way(out)
                address = worker_of(client, index) if index is not None else None
                time.sleep(0.02)
            pid = pids[address] if address else list(pids.values())[0]
            at_kill["finished"] = len(list((out / "parts").glob("*.parquet"))) \
                if (out / "parts").exists() else 0
            os.kill(pid, signal.SIGKILL)
            at_kill["done"] = True

        killer = threading.Thread(target=kill_one_worker)
        killer.start()
        before = server.stats.requests
        report = run_to_parquet(docs_parquet, out, "knowledge_list", llm, rows_per_partition=10,
                                show_progress=False)
        killer.join()
        sent = server.stats.requests - before
    assert at_kill.get("done") and at_kill["finished"] < 6  # the kill landed mid-run
    # issue 23 item 6: the killed attempt's answers are this run's requests (the folder was new:
    # nothing is reused from an earlier run); only those on the wire at the kill are uncounted
    mine = report["this_run"]
    assert mine["reused_answers"] == 0 and mine["requests_of_lost_attempts"] > 0
    assert reference["requests"] <= mine["requests"] <= sent
    key = ["id", "segment_id"]
    got = read_parts(out).sort_values(key).reset_index(drop=True)
    expected = read_parts(tmp_path / "reference").sort_values(key).reset_index(drop=True)
    pd.testing.assert_frame_equal(got, expected)
    assert report["documents_in"] == 60 and report["rows_written"] == reference["rows_written"]
    assert_report_adds_up(report)


# -- bad input ---------------------------------------------------------------------------------
@pytest.fixture
def llm_server():
    with MockLLMServer() as server:
        yield server, LLMConfig(base_url=server.base_url, model="mock")


def _nothing_written(out: Path):
    return not (out / "parts").exists() or not any((out / "parts").iterdir())


def test_missing_input_path(tmp_path, llm_server):
    server, llm = llm_server
    with pytest.raises(InputError, match="does not exist"):
        run_to_parquet(tmp_path / "nope.parquet", tmp_path / "out", "distill", llm)
    assert server.stats.requests == 0


def test_corrupt_parquet_is_named(tmp_path, llm_server):
    server, llm = llm_server
    bad = tmp_path / "broken.parquet"
    bad.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(InputError, match="broken.parquet"):
        run_to_parquet(bad, tmp_path / "out", "distill", llm)
    assert _nothing_written(tmp_path / "out") and server.stats.requests == 0


def test_missing_columns_listed(tmp_path, llm_server):
    server, llm = llm_server
    path = tmp_path / "x.parquet"
    pd.DataFrame({"doc_id": [1], "body": ["x"]}).to_parquet(path)
    with pytest.raises(ValueError, match=r"\['doc_id', 'body'\]"):
        run_to_parquet(path, tmp_path / "out", "distill", llm)
    assert server.stats.requests == 0


def test_duplicate_ids_rejected_before_requests(tmp_path, llm_server):
    server, llm = llm_server
    path = tmp_path / "dupes.jsonl"
    docs = make_docs(5)
    docs.loc[4, "id"] = 1
    docs.to_json(path, orient="records", lines=True)
    with pytest.raises(InputError, match="duplicate id"):
        run_to_parquet(path, tmp_path / "out", "distill", llm, show_progress=False)
    assert server.stats.requests == 0 and _nothing_written(tmp_path / "out")


def test_gzipped_jsonl_reads_like_plain_jsonl(tmp_path):
    import gzip

    from nemocc_dask.io import read_input

    lines = [json.dumps({"id": i, "text": f"doc {i}\u00a0é"}) for i in range(7)]
    body = "\n".join(lines[:3]) + "\n\n  \n" + "\n".join(lines[3:]) + "\n"  # blank lines inside
    plain, packed = tmp_path / "docs.jsonl", tmp_path / "docs.jsonl.gz"
    plain.write_text(body, encoding="utf-8")
    with gzip.open(packed, "wt", encoding="utf-8") as fh:
        fh.write(body)
    frames = {path: read_input(path, rows_per_partition=3) for path in (plain, packed)}
    assert [f.npartitions for f in frames.values()] == [3, 3]
    got = [f.compute().reset_index(drop=True) for f in frames.values()]
    pd.testing.assert_frame_equal(got[0], got[1])
    assert got[0]["id"].tolist() == list(range(7))


def test_empty_input_gives_empty_output_and_report(tmp_path, llm_server):
    server, llm = llm_server
    path = tmp_path / "empty.parquet"
    pq.write_table(pa.Table.from_pandas(make_docs(0), preserve_index=False), path)
    report = run_to_parquet(path, tmp_path / "out", "distill", llm, show_progress=False)
    assert report["empty_input"] and report["documents_in"] == 0
    assert json.loads((tmp_path / "out" / "report.json").read_text())["empty_input"]


def test_output_folder_with_other_files(tmp_path, llm_server, docs_parquet):
    server, llm = llm_server
    out = tmp_path / "out"
    out.mkdir()
    (out / "thesis.docx").write_text("mine")
    with pytest.raises(OutputError, match="not empty"):
        run_to_parquet(docs_parquet, out, "distill", llm)
    assert (out / "thesis.docx").read_text() == "mine"


def test_fingerprint_mismatch_needs_overwrite(tmp_path, docs_parquet, cluster_client):
    with MockLLMServer() as server:
        llm = LLMConfig(base_url=server.base_url, model="mock")
        out = tmp_path / "out"
        run_to_parquet(docs_parquet, out, "knowledge_list", llm, show_progress=False)
        with pytest.raises(OutputError, match="--overwrite"):
            run_to_parquet(docs_parquet, out, "knowledge_list", llm, seed=9, show_progress=False)
        report = run_to_parquet(docs_parquet, out, "knowledge_list", llm, seed=9, overwrite=True,
                                show_progress=False)
    assert report["partitions_skipped"] == 0 and report["documents_in"] == 60


def test_failed_rows_stay_failed_on_resume_unless_retry_failed(tmp_path, docs_parquet,
                                                               cluster_client):
    with MockLLMServer(fail_marker="supports 1", latency=0.0) as server:
        llm = LLMConfig(base_url=server.base_url, model="mock", max_retries=0,
                        max_failed_fraction=1.0)
        out = tmp_path / "out"
        first = run_to_parquet(docs_parquet, out, "distill", llm, show_progress=False)
        assert first["failed_by_class"].get("http_400", 0) > 0
        shutil_parts(out)
        before = server.stats.requests
        second = run_to_parquet(docs_parquet, out, "distill", llm, show_progress=False)
        assert server.stats.requests == before and second["reused_answers"] > 0
        run_to_parquet(docs_parquet, out, "distill", llm, retry_failed=True, show_progress=False)
        assert server.stats.requests - before == first["failed_requests"]


def shutil_parts(out: Path):
    """Forget the finished partitions that had failed requests (their journals are kept,
    compacted), as if the run had been killed before writing them."""
    removed = 0
    for stats in (out / "stats").glob("*.json"):
        if json.loads(stats.read_text())["failed_requests"]:
            assert (out / "journal" / f"{stats.stem}.jsonl.gz").exists()
            (out / "parts" / f"{stats.stem}.parquet").unlink()
            removed += 1
    assert removed


def test_api_key_never_written(tmp_path, docs_parquet):
    secret = "sk-test-SECRET-0123456789"
    with MockLLMServer(api_key=secret, fail_marker="species of birds 10", record_messages=True,
                       rate_500=0.1) as server:
        env = dict(os.environ, MY_KEY=secret)
        out = tmp_path / "out"
        proc = subprocess.run(cli("-v", "run", "--task", "distill", "--input", str(docs_parquet),
                                  "--output", str(out), "--base-url", server.base_url,
                                  "--model", "mock", "--api-key-env", "MY_KEY", "--workers", "1",
                                  "--max-retries", "1"),
                              env=env, capture_output=True, text=True, timeout=300)
        assert server.stats.authorization, proc.stderr[-3000:]
        assert all(a == f"Bearer {secret}"
                                                  for a in server.stats.authorization)
    assert proc.returncode == 0, proc.stderr
    assert secret not in proc.stdout and secret not in proc.stderr
    for path in out.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path
    from nemocc_dask.llm.config import LLMConfig as Config

    assert secret not in repr(Config(base_url="http://x/v1", model="m", api_key=secret))


def test_demo_command_end_to_end(tmp_path):
    """README's first command: bundled sample, in-process mock server, LocalCluster, quiet logs
    (also a slow cluster shutdown on a busy machine), an example row and what the mock does."""
    out = tmp_path / "demo"
    done = subprocess.run(cli("demo", "--no-progress", "--output", str(out)), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    assert report["documents_in"] == 300 and report["rows_written"] > 0
    assert_report_adds_up(report)
    assert "documents written" in done.stdout and "INFO distributed" not in done.stderr
    assert "example row (diverse_qa): " in done.stdout and "on purpose" in done.stdout
    # only the package's own lines at default verbosity: no third-party advisories or warnings
    for noise in ("[transformers]", "PyTorch", "Warning", "distributed."):
        assert noise not in done.stderr, done.stderr


@pytest.mark.parametrize("column", ["score", "tags"])
def test_a_text_column_that_holds_no_text_is_refused_before_requests(tmp_path, llm_server,
                                                                      column):
    """Issue 24 item 5: --text-field naming a numeric or list column is exit 2 with the dtype,
    not a run that writes 0 rows (or sends stringified lists)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    server, llm = llm_server
    docs = make_docs(4)
    table = pa.Table.from_pandas(docs, preserve_index=False).append_column(
        "score", pa.array([1, 2, 3, 4])).append_column(
        "tags", pa.array([["a"], ["b"], [], ["c"]], pa.list_(pa.string())))
    pq.write_table(table, tmp_path / "docs.parquet")
    with pytest.raises(ValueError, match=f"text column '{column}' holds .*, not text"):
        run_to_parquet(tmp_path / "docs.parquet", tmp_path / "out", "distill", llm,
                       text_field=column, show_progress=False)
    assert server.stats.requests == 0 and _nothing_written(tmp_path / "out")


def test_a_resume_does_not_read_unchanged_input_again(tmp_path, llm_server, monkeypatch):
    """Issue 23 item 9: the partition map and the id check are kept in the output folder, keyed
    by each input file's path, size and mtime; a resume of unchanged input reads neither again
    (at terabyte scale that is a full pass per requeue)."""
    from nemocc_dask import io

    server, llm = llm_server
    path = tmp_path / "docs.jsonl"
    make_docs(30).to_json(path, orient="records", lines=True)
    calls = {"partition_map": 0, "check_input": 0}
    for name in calls:
        real = getattr(io, name)

        def counted(*args, _name=name, _real=real, **kwargs):
            calls[_name] += 1
            return _real(*args, **kwargs)
        monkeypatch.setattr(io, name, counted)
    first = run_to_parquet(path, tmp_path / "out", "distill", llm, rows_per_partition=10,
                           show_progress=False)
    assert calls == {"partition_map": 1, "check_input": 1}
    again = run_to_parquet(path, tmp_path / "out", "distill", llm, rows_per_partition=10,
                           show_progress=False)
    assert calls == {"partition_map": 1, "check_input": 1}  # nothing read again
    assert again["partitions_skipped"] == 3 and again["input_rows"] == first["input_rows"] == 30
    with open(path, "a") as fh:  # the input changed: it is read again (and the run refused)
        fh.write('{"id": 99, "text": "one more document"}\n')
    with pytest.raises(Exception, match="the input files"):
        run_to_parquet(path, tmp_path / "out", "distill", llm, rows_per_partition=10,
                       show_progress=False)
    assert calls["partition_map"] == 2


def test_two_demos_write_to_folders_of_their_own():
    started = [subprocess.Popen(cli("demo", "--no-progress", "--workers", "1"),  # two at once
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for _ in range(2)]
    runs = []
    for proc in started:
        out, err = proc.communicate(timeout=300)
        runs.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    folders = [next(line.split("output: ", 1)[1] for line in r.stdout.splitlines()
                    if line.startswith("output: ")) for r in runs]
    assert all(r.returncode == 0 for r in runs) and folders[0] != folders[1]
    for folder in folders:
        assert json.loads((Path(folder) / "report.json").read_text())["documents_in"] == 300
