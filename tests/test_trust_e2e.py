"""Runs a user can trust, as a user meets them: an outage then --retry-failed with the output kept,
a resume with other partitions refused, refused runs that leave the folder as it was, incomplete
Wikipedia documents, a broken endpoint or client stopping the run, stable reject files, the lock."""

import json
import subprocess
import sys
import time
from pathlib import Path

import dask.dataframe as dd
import pandas as pd
import pyarrow.parquet as pq
import pytest
from conftest import make_docs

from nemocc_dask import LLMConfig
from nemocc_dask.errors import RunError
from nemocc_dask.run.output_folder import OutputError
from nemocc_dask.run.runner import run_to_parquet
from nemocc_dask.testing.mock import MockLLMServer

pytestmark = pytest.mark.slow


def cli(*args):
    return [sys.executable, "-m", "nemocc_dask.cli", *args]


def read_parts(out: Path) -> pd.DataFrame:
    frame = pd.concat([pd.read_parquet(f) for f in sorted((out / "parts").glob("*.parquet"))],
                      ignore_index=True)
    return frame.sort_values(["id", "segment_id"]).reset_index(drop=True)


def snapshot(folder: Path) -> dict:
    """Every file under ``folder`` with its bytes (what 'unchanged' means)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def test_outage_then_retry_failed_recovers_rows_with_parts_kept(tmp_path, docs_parquet,
                                                                cluster_client):
    with MockLLMServer(latency=0.002) as server:
        ok = LLMConfig(base_url=server.base_url, model="mock")
        reference = run_to_parquet(docs_parquet, tmp_path / "reference", "distill", ok,
                                   rows_per_partition=20, show_progress=False)
        server.rates = (0.0, 1.0, 0.0)  # the outage: every request answers 500
        down = LLMConfig(base_url=server.base_url, model="mock", max_retries=0,
                         max_failed_fraction=1.0)
        out = tmp_path / "out"
        first = run_to_parquet(docs_parquet, out, "distill", down, rows_per_partition=20,
                               show_progress=False)
        server.rates = (0.0, 0.0, 0.0)  # the endpoint is back
        before = server.stats.requests
        again = run_to_parquet(docs_parquet, out, "distill", down, rows_per_partition=20,
                               show_progress=False)
        assert server.stats.requests == before  # without --retry-failed: nothing resent
        proc = subprocess.run(cli("run", "--task", "distill", "--input", str(docs_parquet),
                                  "--output", str(out), "--base-url", server.base_url,
                                  "--model", "mock", "--max-retries", "0",
                                  "--max-failed-fraction", "1", "--rows-per-partition", "20",
                                  "--workers", "1", "--retry-failed", "--no-progress"),
                              capture_output=True, text=True, timeout=300)
        resent = server.stats.requests - before
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert first["failed_requests"] == first["segments"] > 0 and first["rows_written"] == 0
    assert again["rows_written"] == 0
    assert resent == first["failed_requests"]  # only the failed requests, once each
    final = json.loads((out / "report.json").read_text())
    assert final["recovered"] == first["failed_requests"] and final["failed_requests"] == 0
    assert final["rows_written"] == reference["rows_written"] and final["accounted"]
    pd.testing.assert_frame_equal(read_parts(out), read_parts(tmp_path / "reference"))
    rejects = pd.concat(pd.read_parquet(f) for f in (out / "rejects").glob("*.parquet"))
    assert "llm_error" not in set(rejects["reject_reason"])


def test_resume_with_other_rows_per_partition_is_refused(tmp_path, docs_parquet, cluster_client):
    out = tmp_path / "out"
    with MockLLMServer() as server:
        llm = LLMConfig(base_url=server.base_url, model="mock")
        run_to_parquet(docs_parquet, out, "knowledge_list", llm, rows_per_partition=20,
                       show_progress=False)
        (out / "parts" / "part-00001.parquet").unlink()
        before = snapshot(out)
        with pytest.raises(OutputError, match="partition map .*3 partitions before, 6 now"):
            run_to_parquet(docs_parquet, out, "knowledge_list", llm, rows_per_partition=10,
                           show_progress=False)
        assert snapshot(out) == before
        report = run_to_parquet(docs_parquet, out, "knowledge_list", llm, rows_per_partition=20,
                                show_progress=False)
    parts = read_parts(out)
    assert not parts.duplicated(["id", "segment_id"]).any()
    assert report["documents_in"] == 60 and report["accounted"]


def test_overwrite_with_dead_endpoint_leaves_folder_byte_identical(tmp_path, docs_parquet):
    out = tmp_path / "out"
    with MockLLMServer() as server:
        base = ["run", "--task", "distill", "--input", str(docs_parquet), "--output", str(out),
                "--model", "mock", "--workers", "1", "--no-progress"]
        subprocess.run(cli(*base, "--base-url", server.base_url), check=True,
                       capture_output=True, timeout=300)
    before = snapshot(out)
    proc = subprocess.run(cli(*base, "--base-url", "http://127.0.0.1:9/v1", "--overwrite"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "cannot reach endpoint http://127.0.0.1:9/v1" in proc.stderr
    assert snapshot(out) == before


def test_refused_run_leaves_nothing_and_the_corrected_rerun_works(tmp_path):
    docs = make_docs(20)
    docs.loc[5, "id"] = 4  # a duplicate id
    path = tmp_path / "docs.parquet"
    docs.to_parquet(path, index=False)
    out = tmp_path / "out"
    with MockLLMServer() as server:
        base = ["run", "--task", "distill", "--input", str(path), "--output", str(out),
                "--base-url", server.base_url, "--model", "mock", "--workers", "1",
                "--no-progress"]
        refused = subprocess.run(cli(*base), capture_output=True, text=True, timeout=300)
        assert refused.returncode == 2 and "duplicate id" in refused.stderr
        assert not out.exists()
        assert server.stats.requests == 0
        docs.loc[5, "id"] = 5
        docs.to_parquet(path, index=False)
        fixed = subprocess.run(cli(*base), capture_output=True, text=True, timeout=300)
    assert fixed.returncode == 0, fixed.stderr[-2000:]
    assert json.loads((out / "report.json").read_text())["documents_in"] == 20


def _four_segment_docs() -> pd.DataFrame:
    """Documents of four paragraphs of ~300 tokens each (so four segments each); document 1's
    third paragraph carries the mock's failure marker."""
    def paragraph(doc: int, k: int) -> str:
        marker = "FAILME " if (doc, k) == (1, 2) else ""
        return marker + (f"Paragraph {k} of document {doc} describes the valley, its rivers and "
                         f"the mills that stood along them for two centuries. ") * 12
    return pd.DataFrame({"id": [0, 1, 2],
                         "text": ["\n".join(paragraph(d, k) for k in range(4)) for d in range(3)]})


@pytest.mark.parametrize("keep_incomplete", [False, True])
def test_wikipedia_document_with_a_failed_segment(tmp_path, cluster_client, keep_incomplete):
    path = tmp_path / "docs.parquet"
    docs = _four_segment_docs()
    docs.to_parquet(path, index=False)
    out = tmp_path / "out"
    with MockLLMServer(fail_marker="FAILME") as server:
        llm = LLMConfig(base_url=server.base_url, model="mock", max_retries=0)
        report = run_to_parquet(path, out, "wikipedia_paraphrasing", llm, show_progress=False,
                                keep_incomplete_documents=keep_incomplete)
    assert report["segments"] == 12 and report["accounted"]
    parts = pd.read_parquet(out / "parts")
    rejects = pd.read_parquet(out / "rejects")
    assert list(rejects.loc[rejects["reject_reason"] == "llm_error", "id"]) == [1]
    assert (parts["segments_total"] == 4).all()
    if keep_incomplete:
        assert sorted(parts["id"]) == [0, 1, 2]
        row = parts.set_index("id").loc[1]
        assert row["segments_kept"] == 3 and "FAILME" not in row["text"]
    else:
        assert sorted(parts["id"]) == [0, 2] and (parts["segments_kept"] == 4).all()
        assert report["documents_not_written"] == {"incomplete_document": 1}
        incomplete = rejects[rejects["reject_reason"] == "incomplete_document"]
        assert list(incomplete["id"]) == [1, 1, 1]
        assert set(incomplete["reject_detail"]) == {"3 of 4 segments left"}
    # a re-joined row describes the whole document, not its first segment
    whole = parts.set_index("id").loc[0]
    assert whole["text"] == docs.loc[0, "text"]
    assert whole["segment_token_count"] > 4 * 250
    assert whole["llm_completion_tokens"] > 4 * 200


class TypeErrorClient:
    """A custom client with a bug: every call raises TypeError."""

    def complete_sync(self, messages, settings):
        return len(messages) + "tokens"


def test_broken_custom_client_stops_the_run_with_its_error(tmp_path, docs_parquet,
                                                           cluster_client):
    out = tmp_path / "out"
    llm = LLMConfig(client_factory=TypeErrorClient, failure_min_requests=10)
    with pytest.raises(RunError, match=r"client_error: TypeError: .*unsupported operand"):
        run_to_parquet(docs_parquet, out, "distill", llm, show_progress=False)
    assert not list((out / "parts").glob("*.parquet"))


def test_dead_endpoint_mid_run_exits_1_with_the_reason(tmp_path, docs_parquet):
    out = tmp_path / "out"
    with MockLLMServer(rate_500=1.0) as server:
        proc = subprocess.run(cli("run", "--task", "distill", "--input", str(docs_parquet),
                                  "--output", str(out), "--base-url", server.base_url,
                                  "--model", "mock", "--max-retries", "0", "--workers", "1",
                                  "--max-in-flight", "4", "--no-progress"),
                              capture_output=True, text=True, timeout=300)
        sent = server.stats.requests
    assert proc.returncode == 1
    assert "http_500" in proc.stderr and "stopped sending" in proc.stderr
    assert "rerun with -v" in proc.stderr and "Traceback" not in proc.stderr
    assert 50 <= sent <= 54  # stopped once 50 had failed, with at most a window in flight


def test_rejects_of_all_partitions_read_back_with_every_column(tmp_path, docs_parquet,
                                                               cluster_client):
    out = tmp_path / "out"
    with MockLLMServer(fail_marker="supports 1") as server:
        llm = LLMConfig(base_url=server.base_url, model="mock", max_retries=0,
                        max_failed_fraction=1.0)
        run_to_parquet(docs_parquet, out, "distill", llm, rows_per_partition=20,
                       show_progress=False, postprocess_max_tokens=60)
    files = sorted((out / "rejects").glob("*.parquet"))
    schemas = {str(pq.read_schema(f)) for f in files}
    assert len(files) == 3 and len(schemas) == 1
    rejects = dd.read_parquet(str(out / "rejects")).compute()
    for column in ("response_token_count", "output_token_count", "llm_raw_output",
                   "reject_detail", "llm_error"):
        assert column in rejects.columns
    too_long = rejects[rejects["reject_reason"] == "too_long"]
    assert len(too_long) and (too_long["response_token_count"] > 60).all()
    assert all(d.startswith("response_token_count ") and d.endswith("> 60")
               for d in too_long["reject_detail"])
    assert too_long["llm_raw_output"].str.startswith("Paraphrased Text:").all()
    failed = rejects[rejects["reject_reason"] == "llm_error"]
    assert len(failed) and failed["reject_detail"].str.contains("http_400").all()


def test_second_run_on_a_locked_folder_is_refused(tmp_path, docs_parquet):
    out = tmp_path / "out"
    with MockLLMServer(latency=0.3) as server:
        base = ["run", "--task", "knowledge_list", "--input", str(docs_parquet), "--output",
                str(out), "--base-url", server.base_url, "--model", "mock", "--workers", "1",
                "--max-in-flight", "2", "--no-progress"]
        first = subprocess.Popen(cli(*base), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                 text=True)
        deadline = time.time() + 120
        while time.time() < deadline and not (out / ".nemocc.lock").exists():
            time.sleep(0.1)
        second = subprocess.run(cli(*base), capture_output=True, text=True, timeout=300)
        # a requeued job that starts while the old one still runs: it waits, then resumes
        third = subprocess.run(cli(*base, "--wait-for-lock", "300"), capture_output=True,
                               text=True, timeout=400)
        first.communicate(timeout=300)
    assert second.returncode == 2
    assert f"pid {first.pid}" in second.stderr and "being written by another run" in second.stderr
    assert first.returncode == 0 and third.returncode == 0, third.stderr
    assert server.stats.requests == 60  # the waiting run paid for nothing twice
    assert not (out / ".nemocc.lock").exists()


def test_a_run_whose_folder_is_taken_meanwhile_stops_sending_and_says_so(tmp_path, docs_parquet):
    """Another host's run took the folder (it judged this run's lock stale, e.g. across a
    network partition): this run sees it at its next heartbeat, stops sending at once, and
    exits 1 saying who took it."""
    out = tmp_path / "out"
    with MockLLMServer(latency=1.0) as server:
        run = subprocess.Popen(cli("run", "--task", "knowledge_list", "--input", str(docs_parquet),
                                   "--output", str(out), "--base-url", server.base_url,
                                   "--model", "mock", "--workers", "1", "--max-in-flight", "2",
                                   "--no-progress"), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 120
        while time.time() < deadline and server.stats.completed < 4:
            time.sleep(0.1)
        (out / ".nemocc.lock").write_text(json.dumps(
            {"host": "othernode", "pid": 4242, "token": "theirs", "heartbeat": time.time()}))
        _, err = run.communicate(timeout=120)
        sent = server.stats.requests
        time.sleep(2)
        assert server.stats.requests == sent  # nothing more after it stopped
    assert run.returncode == 1, err
    assert "host othernode, pid 4242" in err and "stopped sending" in err
    assert sent < 60  # it did not run to the end
    assert json.loads((out / ".nemocc.lock").read_text())["token"] == "theirs"


def test_stale_lock_and_temp_files_of_a_dead_run_are_cleaned(tmp_path, docs_parquet,
                                                            cluster_client):
    import socket

    out = tmp_path / "out"
    with MockLLMServer() as server:
        llm = LLMConfig(base_url=server.base_url, model="mock")
        run_to_parquet(docs_parquet, out, "distill", llm, show_progress=False)
        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True).stdout.strip()
        (out / ".nemocc.lock").write_text(json.dumps(
            {"host": socket.gethostname(), "pid": int(dead), "heartbeat": time.time()}))
        stale = out / "parts" / ".part-00000.parquet.otherhost.123.abcd.nemocc-tmp"
        stale.write_bytes(b"half a file")
        report = run_to_parquet(docs_parquet, out, "distill", llm, show_progress=False)
    assert report["partitions_skipped"] == report["partitions"]
    assert not stale.exists() and not (out / ".nemocc.lock").exists()


@pytest.mark.parametrize("damage, expected", [
    ("repeat", "duplicate id(s), each used by more than one document (3 in partition(s) [0, 2])"),
    ("null", "1 missing (null) id(s), e.g. row 2 of partition 1"),
])
def test_ids_are_checked_across_the_whole_input(tmp_path, damage, expected):
    """An id used again in another partition, or a missing id: exit 2 before any request, with
    where to look (the old check only looked inside each partition)."""
    docs = make_docs(30, paragraphs=1)
    if damage == "repeat":
        docs.loc[25, "id"] = 3  # partition 2 (rows 20-29) repeats an id of partition 0
    else:
        docs["id"] = docs["id"].astype("Int64")
        docs.loc[12, "id"] = None
    path = tmp_path / "docs.parquet"
    docs.to_parquet(path, index=False, row_group_size=10)
    out = tmp_path / "out"
    with MockLLMServer() as server:
        proc = subprocess.run(cli("run", "--task", "distill", "--input", str(path), "--output",
                                  str(out), "--base-url", server.base_url, "--model", "mock",
                                  "--workers", "1", "--no-progress", "--rows-per-partition",
                                  "10"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and expected in proc.stderr, proc.stderr[-2000:]
    assert server.stats.requests == 0 and not out.exists()


def test_an_output_folder_inside_the_input_folder_is_refused(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    make_docs(10).to_parquet(folder / "docs.parquet", index=False)
    with MockLLMServer() as server:
        proc = subprocess.run(cli("run", "--task", "distill", "--input", str(folder), "--output",
                                  str(folder / "out"), "--base-url", server.base_url, "--model",
                                  "mock", "--workers", "1", "--no-progress"),
                              capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "is inside the input folder" in proc.stderr, proc.stderr
    assert server.stats.requests == 0 and sorted(p.name for p in folder.iterdir()) == [
        "docs.parquet"]


def test_a_resumed_run_reports_what_it_did_apart_from_the_runs_before(tmp_path, docs_parquet):
    """A rerun that sends nothing says so (this_run: 0 requests, its own wall time) and keeps the
    history: the folder's totals, and each run's own figures in ``runs``."""
    out = tmp_path / "out"
    with MockLLMServer(latency=0.01) as server:
        base = cli("run", "--task", "distill", "--input", str(docs_parquet), "--output",
                   str(out), "--base-url", server.base_url, "--model", "mock", "--workers", "1",
                   "--no-progress")
        assert subprocess.run(base, capture_output=True, timeout=300).returncode == 0
        first = json.loads((out / "report.json").read_text())
        again = subprocess.run(base, capture_output=True, text=True, timeout=300)
    report = json.loads((out / "report.json").read_text())
    assert again.returncode == 0
    assert first["this_run"]["requests"] == first["requests"] == 60
    assert report["requests"] == 60 and report["this_run"]["requests"] == 0
    assert report["this_run"]["completion_tokens_per_second"] == 0.0
    assert [r["requests"] for r in report["runs"]] == [60, 0]
    assert report["wall_seconds"] == pytest.approx(sum(r["wall_seconds"] for r in report["runs"]),
                                                   abs=0.01)
    assert "this run: requests sent" in again.stdout


def test_a_damaged_part_is_noticed_and_redone_without_paying_again(tmp_path, docs_parquet):
    """Issue 23 item 2: a finished run whose part was cut in half. `verify` says so; the rerun
    redoes that partition from its kept (compacted) journal, sends nothing, and the part is
    whole again; so is a part deleted by hand."""
    out = tmp_path / "out"
    with MockLLMServer(latency=0.001) as server:
        base = cli("run", "--task", "distill", "--input", str(docs_parquet), "--output",
                   str(out), "--base-url", server.base_url, "--model", "mock", "--workers", "1",
                   "--no-progress", "--rows-per-partition", "20")
        assert subprocess.run(base, capture_output=True, timeout=300).returncode == 0
        clean = read_parts(out)
        assert subprocess.run(cli("verify", str(out)), capture_output=True).returncode == 0
        part = out / "parts" / "part-00001.parquet"
        part.write_bytes(part.read_bytes()[: part.stat().st_size // 2])  # cut in half
        checked = subprocess.run(cli("verify", str(out)), capture_output=True, text=True)
        assert checked.returncode == 1 and "part-00001.parquet" in checked.stdout
        sent = server.stats.requests
        again = subprocess.run(base, capture_output=True, text=True, timeout=300)
        assert again.returncode == 0, again.stderr[-2000:]
        (out / "parts" / "part-00002.parquet").unlink()  # deleted by hand
        third = subprocess.run(base, capture_output=True, text=True, timeout=300)
        assert third.returncode == 0, third.stderr[-2000:]
        assert server.stats.requests == sent  # both redone from their journals, unpaid
    assert "part-00001.parquet is" in again.stderr and "redone" in again.stderr
    pd.testing.assert_frame_equal(read_parts(out), clean)
    assert subprocess.run(cli("verify", str(out)), capture_output=True).returncode == 0
    report = json.loads((out / "report.json").read_text())
    assert report["accounted"] and report["this_run"]["reused_answers"] == 20


def test_a_run_that_ends_with_failed_rows_says_how_to_resend_them(tmp_path, docs_parquet):
    with MockLLMServer(fail_marker="supports 1", latency=0.001) as server:
        done = subprocess.run(cli("run", "--task", "distill", "--input", str(docs_parquet),
                                  "--output", str(tmp_path / "out"), "--base-url",
                                  server.base_url, "--model", "mock", "--workers", "1",
                                  "--no-progress", "--max-retries", "0"),
                              capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert "failed at the LLM (http_400)" in last and "--retry-failed" in last


def test_documents_removed_before_generation_are_in_rejects_with_their_reason(tmp_path):
    """Issue 24 item 6: which ids were lost before any request (no text, too short) is in
    rejects/ with the reason, not only counted; every rejects file keeps one schema."""
    docs = make_docs(20, paragraphs=1)
    docs["text"] = docs["text"].astype(object)
    docs.loc[3, "text"] = None
    docs.loc[7, "text"] = ""
    docs.loc[11, "text"] = "Too short."
    path = tmp_path / "docs.parquet"
    docs.to_parquet(path, index=False, row_group_size=10)
    out = tmp_path / "out"
    with MockLLMServer(latency=0.001) as server:
        report = run_to_parquet(path, out, "distill",
                                LLMConfig(base_url=server.base_url, model="mock"),
                                rows_per_partition=10, show_progress=False)
    files = sorted((out / "rejects").glob("*.parquet"))
    schemas = {tuple(pq.read_schema(f).names) for f in files}
    rejects = pd.concat(pd.read_parquet(f) for f in files)
    reasons = dict(zip(rejects["id"], rejects["reject_reason"]))
    assert reasons[3] == reasons[7] == "invalid_text" and reasons[11] == "document_too_short"
    assert len(schemas) == 1 and report["accounted"]
    assert report["documents_not_written"]["invalid_text"] == 2


@pytest.mark.parametrize("given, output, refused", [
    ("data/*.parquet", "out", False),  # was refused: the glob's folder was taken to be "."
    ("data/*.parquet", "data/out", True),
    ("data/docs-*.parquet", "data/out", True),
    ("data/docs-*.parquet", "out", False),
    ("data", "data/out", True),
    ("data", "out", False),
    ("nothing-here/*.parquet", "out", False),  # a glob without a folder: the input check's
])
def test_the_folder_of_a_glob_is_the_one_it_names(tmp_path, monkeypatch, given, output, refused):
    import types

    from nemocc_dask.run.inputs import refuse_output_inside_input
    from nemocc_dask.run.output_folder import OutputError

    (tmp_path / "data").mkdir()
    monkeypatch.chdir(tmp_path)
    jobs = [types.SimpleNamespace(out_dir=Path(output))]
    if refused:
        with pytest.raises(OutputError, match="inside the input folder 'data'"):
            refuse_output_inside_input(given, jobs)
    else:
        refuse_output_inside_input(given, jobs)


@pytest.mark.slow
def test_a_glob_input_with_the_output_beside_its_folder_runs(tmp_path, monkeypatch):
    """``--input 'data/*.parquet' --output out`` from the folder above: refused before as an
    output "inside the input folder '.'", and the pattern was read as a missing path."""
    (tmp_path / "data").mkdir()
    make_docs(6).to_parquet(tmp_path / "data" / "a.parquet", index=False)
    make_docs(6, start=6).to_parquet(tmp_path / "data" / "b.parquet", index=False)
    monkeypatch.chdir(tmp_path)
    with MockLLMServer() as server:
        proc = subprocess.run(cli("run", "--task", "distill", "--input", "data/*.parquet",
                                  "--output", "out", "--base-url", server.base_url, "--model",
                                  "mock", "--workers", "1", "--no-progress"),
                              capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["documents_in"] == 12 and report["accounted"]
