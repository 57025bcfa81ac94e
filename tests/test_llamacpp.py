"""A real inference server that is not ours: llama.cpp's llama-server (built by
.ci/build_llama_server.sh; the tests skip without it) serving a tiny llama of random weights
written here as GGUF with a small BPE of its own. The CLI starts it with the ``llamacpp`` preset
next to the workers, finds its tokenizer through llama.cpp's /tokenize (the GGUF file agrees),
reads its context from /v1/models, gets every answer, and leaves no server behind."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.request

import pytest
from conftest import make_docs
from served_models import build_small_tokenizer, write_gguf
from test_serve import _alive

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    shutil.which("llama-server") is None,
    reason="llama-server is not on PATH (build it with: bash .ci/build_llama_server.sh)")]


@pytest.mark.parametrize("per, n_servers", [("worker", 2), ("node", 1)])
def test_cli_serves_a_gguf_model_with_llama_cpp(tmp_path, per, n_servers):
    model = write_gguf(build_small_tokenizer(tmp_path / "tokenizer"), tmp_path / "tiny.gguf",
                       weights=True)
    make_docs(40).to_parquet(tmp_path / "docs.parquet")
    done = subprocess.run(
        [sys.executable, "-m", "nemocc_dask.cli", "run", "--task", "knowledge_list", "--input",
         str(tmp_path / "docs.parquet"), "--output", str(tmp_path / "out"), "--serve",
         f"llamacpp:{model}", "--serve-per", per, "--workers", "2",  # the preset as it is
         "--rows-per-partition", "10", "--max-tokens", "256", "--no-progress"],
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    servers = report["served"]["servers"]
    assert len(servers) == n_servers and report["served"]["restarts"] == 0
    assert report["tokenizer"] == str(model) and report["served_context"] == 8192
    assert report["requests"] == 40 and report["failed_requests"] == 0 and report["accounted"]
    assert report["completion_tokens"] > 0
    assert set(report["endpoints"]) == {s["url"] for s in servers}
    assert all(e["requests"] > 0 for e in report["endpoints"].values())
    assert not any(_alive(pid) for s in servers for pid in s["pids"])
    left = subprocess.run(["pgrep", "-f", f"llama-server -m {model}"], capture_output=True)
    assert left.returncode == 1, left.stdout
    assert all(os.path.getsize(s["log"]) > 0 for s in servers)


def test_the_queue_gauges_of_a_llama_cpp_server_are_read(tmp_path):
    """The llamacpp preset starts llama-server with --metrics; its gauges give the controller
    the server's running and waiting requests."""
    import asyncio

    from nemocc_dask.llm.telemetry import parse_queue_metrics
    from nemocc_dask.serve.process import ServedProcess, ServeSpec

    model = write_gguf(build_small_tokenizer(tmp_path / "tokenizer"), tmp_path / "tiny.gguf",
                       weights=True)
    server = ServedProcess(ServeSpec.parse(f"llamacpp:{model}", startup_timeout=60),
                           "127.0.0.1", "", tmp_path / "server.log")
    server.start()
    try:
        asyncio.run(server.wait_healthy())
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics") as answer:
            assert parse_queue_metrics(answer.read().decode()) == (0, 0)
    finally:
        server.stop()
    assert not _alive(server.pids[0])
