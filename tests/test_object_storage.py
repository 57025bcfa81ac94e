"""Input and output on object storage: a real S3 API (moto's server) on 127.0.0.1, the CLI as a user
runs it with credentials in the environment, kill -9 mid-run and a resume."""

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

moto_server = pytest.importorskip("moto.server")
pytest.importorskip("s3fs")
pytest.importorskip("upath")
pytestmark = pytest.mark.slow
SECRET = "nemocc-test-secret-key-0123456789"
KEY = ["id", "segment_id"]


@pytest.fixture
def s3(monkeypatch):
    """A local S3 API with bucket ``corpus``; credentials and endpoint in the environment, the
    way boto/fsspec users configure them."""
    import boto3

    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "nemocc-test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://{host}:{port}")
    client = boto3.client("s3")
    client.create_bucket(Bucket="corpus")
    yield client
    server.stop()


def _keys(client, prefix: str) -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket="corpus", Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def _parts(client, prefix: str) -> pd.DataFrame:
    import io

    frames = [pd.read_parquet(io.BytesIO(client.get_object(Bucket="corpus", Key=k)["Body"].read()))
              for k in sorted(_keys(client, prefix)) if "/parts/" in k]
    return pd.concat(frames, ignore_index=True).sort_values(KEY).reset_index(drop=True)


def _cli(*args) -> list[str]:
    return [sys.executable, "-m", "nemocc_dask.cli", *args]


def test_s3_input_and_output_with_kill_and_resume(s3, tmp_path):
    local = tmp_path / "docs.parquet"
    make_docs(60).to_parquet(local, row_group_size=60)
    s3.upload_file(str(local), "corpus", "in/docs.parquet")
    with MockLLMServer(latency=0.3) as server:
        common = ["run", "--task", "knowledge_list", "--base-url", server.base_url, "--model",
                  "mock", "--max-in-flight", "4", "--workers", "1", "--threads-per-worker", "2",
                  "--rows-per-partition", "10", "--no-progress"]
        reference = tmp_path / "reference"
        subprocess.run(_cli(*common, "--input", str(local), "--output", str(reference)),
                       check=True, capture_output=True, timeout=300)
        before = server.stats.requests
        args = _cli(*common, "--input", "s3://corpus/in/", "--output", "s3://corpus/out")
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        deadline = time.time() + 120
        while time.time() < deadline and not any("/parts/" in k for k in _keys(s3, "out/")):
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        finished = [k for k in _keys(s3, "out/") if "/parts/" in k]
        assert 1 <= len(finished) < 6, "the kill did not land mid-run"
        done = subprocess.run(args, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        sent = server.stats.requests - before
    expected = pd.concat(pd.read_parquet(f) for f in sorted((reference / "parts").glob("*")))
    expected = expected.sort_values(KEY).reset_index(drop=True)
    pd.testing.assert_frame_equal(_parts(s3, "out/"), expected)
    assert sent < 60 + 60 - 10 * len(finished) + 1  # finished partitions were not sent again
    keys = _keys(s3, "out/")
    assert "out/report.json" in keys and "out/run.json" in keys
    journals = [k for k in keys if "/journal/" in k]  # each finished one compacted: no chunks
    assert journals and all(k.endswith(".jsonl.gz") for k in journals), journals
    assert SECRET not in done.stdout + done.stderr
    for key in keys:
        assert SECRET.encode() not in s3.get_object(Bucket="corpus", Key=key)["Body"].read(), key


def test_journal_on_s3_is_written_in_chunks_and_read_back(s3, nemocc_config):
    from nemocc_dask.run.generate import Journal

    nemocc_config({"journal.chunk-records": 2})
    journal = Journal("s3://corpus/jtest/journal/part-00000.jsonl")
    sink = journal.open()
    for i in range(5):
        sink.write(f'{{"key": "k{i}", "text": "a{i}"}}\n')
        sink.flush()
    assert len(_keys(s3, "jtest/journal/")) == 2  # two full chunks written; one answer buffered
    sink.close()
    assert len(_keys(s3, "jtest/journal/")) == 3
    again = Journal("s3://corpus/jtest/journal/part-00000.jsonl").open()  # a resumed writer
    again.write('{"key": "k1", "text": "newer"}\n')
    again.close()
    records = Journal("s3://corpus/jtest/journal/part-00000.jsonl").load()
    assert sorted(records) == [f"k{i}" for i in range(5)] and records["k1"]["text"] == "newer"
    journal.compact()  # the partition finished: one gzip object instead of the chunks
    assert _keys(s3, "jtest/journal/") == ["jtest/journal/part-00000.jsonl.gz"]
    assert Journal("s3://corpus/jtest/journal/part-00000.jsonl").load() == records


def test_unknown_protocol_is_a_clear_start_error():
    from nemocc_dask.errors import StartError
    from nemocc_dask.io.storage import as_path

    with pytest.raises(StartError, match="fsspec backend"):
        as_path("nosuchfs://bucket/folder")


def test_a_missing_bucket_is_exit_2_naming_it(s3, tmp_path):
    """Issue 24 item 8: an output (or input) in a bucket that does not exist is refused at start
    with the bucket named, not exit 1 after the run has begun."""
    local = tmp_path / "docs.parquet"
    make_docs(10).to_parquet(local)
    with MockLLMServer() as server:
        common = ["run", "--task", "distill", "--base-url", server.base_url, "--model", "mock",
                  "--workers", "1", "--no-progress"]
        out = subprocess.run(_cli(*common, "--input", str(local), "--output", "s3://nosuch/out"),
                             capture_output=True, text=True, timeout=300)
        inp = subprocess.run(_cli(*common, "--input", "s3://nosuch/in/", "--output",
                                  str(tmp_path / "out")), capture_output=True, text=True,
                             timeout=300)
        assert server.stats.requests == 0
    for proc, what in ((out, "output folder"), (inp, "input path")):
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert f"{what} 's3://nosuch/" in proc.stderr and "bucket 'nosuch' does not exist" \
            in proc.stderr, proc.stderr[-2000:]
