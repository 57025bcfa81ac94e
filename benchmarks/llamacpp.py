"""llama.cpp started by the ``llamacpp:`` preset vs started by hand (issue 28 item 2): completion
tokens/s of one llama-server under the same load, as the preset starts it (``--poll 0``, threads
= the worker's CPU share, here all of this machine's cores), with llama.cpp's defaults, and with
hand-picked flags; goal: the preset reaches at least half the best hand-started figure.

The model is a tiny llama of random weights written as GGUF (``tests/served_models.py``), so the
figures measure the server's threading and polling on this machine, not a real model's speed.
Needs ``llama-server`` on PATH (``bash .ci/build_llama_server.sh``); skipped without it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.suites import _table

REQUESTS, IN_FLIGHT, MAX_TOKENS, WARM_UP = 128, 4, 96, 8
SECONDS = 60.0  # at most this long per server (llama.cpp's defaults may be 1000x slower)


def _tokens_per_second(port: int, requests: int, seconds: float) -> float:
    """Completion tokens per second of ``requests`` answers (or of those done in ``seconds``)."""
    from nemocc_dask.llm.config import LLMConfig
    from nemocc_dask.llm.pool import Request
    from nemocc_dask.llm.pools import new_pool

    llm = LLMConfig(base_url=f"http://127.0.0.1:{port}/v1", model="m", max_in_flight=IN_FLIGHT,
                    timeout=600)
    pool = new_pool(llm, IN_FLIGHT)
    batch = [Request(f"k{i}", [{"role": "user", "content": f"Tell me about river {i}."}],
                     {"model": "m", "max_tokens": MAX_TOKENS, "ignore_eos": True,
                      "temperature": 0.5}) for i in range(requests)]
    tokens, started = 0, time.perf_counter()
    try:
        for result in pool.stream(batch):
            if result.error:
                raise RuntimeError(f"a request failed: {result.error}")
            tokens += result.completion.completion_tokens or 0
            if time.perf_counter() - started > seconds:
                break
        return tokens / (time.perf_counter() - started)
    finally:
        pool.close()


def _measure(command: str, model: Path, log: Path, requests: int, seconds: float) -> float:
    from nemocc_dask.serve.process import ServedProcess, ServeSpec

    spec = ServeSpec.parse(command.replace("MODEL", str(model)), startup_timeout=120)
    if spec.command == command.replace("MODEL", str(model)):  # a hand-written command
        spec = ServeSpec(spec.command, health="/health", startup_timeout=120)
    server = ServedProcess(spec, "127.0.0.1", "", log, threads=os.cpu_count())
    server.start()
    try:
        asyncio.run(server.wait_healthy())
        _tokens_per_second(server.port, WARM_UP, seconds)  # first requests load the model
        return _tokens_per_second(server.port, requests, seconds)
    finally:
        server.stop()


def llamacpp(out: Path, quick: bool = False) -> dict:
    if shutil.which("llama-server") is None:
        return {"rows": [], "table": "skipped: llama-server is not on PATH (bash "
                                     ".ci/build_llama_server.sh builds it)"}
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from served_models import build_small_tokenizer, write_gguf

    hand = "llama-server -m MODEL --host {host} --port {port} -c 8192"
    variants = [("preset: --serve llamacpp:MODEL", "llamacpp:MODEL -c 8192"),
                ("by hand, llama.cpp defaults", hand),
                ("by hand, --poll 0 --threads 1", hand + " --poll 0 --threads 1 --threads-batch 1"),
                ("by hand, --poll 0 --threads 2", hand + " --poll 0 --threads 2 --threads-batch 2")]
    if quick:  # a smoke run: no slow defaults, few requests
        variants = [v for v in variants if "defaults" not in v[0]]
    requests, seconds = (8, 20.0) if quick else (REQUESTS, SECONDS)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model = write_gguf(build_small_tokenizer(Path(tmp) / "tok"), Path(tmp) / "tiny.gguf",
                           weights=True)
        for load in ("idle", "busy"):  # busy: one spinning process per core, as on a laptop
            best: dict[str, float] = {}
            with _busy_cores(os.cpu_count() if load == "busy" else 0):
                # each server measured in both orders (the first after a change is slower),
                # its best kept
                for order in (variants, variants[::-1])[:1 if quick else 2]:
                    for label, command in order:
                        figure = _measure(command, model, Path(tmp) / f"{load}-{len(best)}.log",
                                          requests, seconds)
                        best[label] = max(best.get(label, 0.0), figure)
                        print({"machine": load, "server": label, "tokens_per_s": round(figure, 1)},
                              flush=True)
            rows += [{"machine": load, "server": label, "tokens_per_s": round(best[label], 1)}
                     for label, _ in variants]
    for load in ("idle", "busy"):
        mine = [r for r in rows if r["machine"] == load]
        best_hand = max(r["tokens_per_s"] for r in mine if r["server"].startswith("by hand"))
        for row in mine:
            row["vs_best_by_hand"] = round(row["tokens_per_s"] / best_hand, 3)
    return {"rows": rows, "table": _table(rows, ["machine", "server", "tokens_per_s",
                                                 "vs_best_by_hand"]) + (
        f"\n\n{requests} requests of {MAX_TOKENS} tokens (ignore_eos; at most {seconds:g} s per "
        f"server, after {WARM_UP} untimed; each server measured in both orders, the best kept), "
        f"{IN_FLIGHT} in flight, on a tiny random-weight "
        f"llama; {os.cpu_count()} cores; `busy`: {os.cpu_count()} other processes spinning. "
        "Goal: the preset's `vs_best_by_hand` >= 0.5.")}


@contextlib.contextmanager
def _busy_cores(n: int):
    """``n`` processes that spin a core each while the block runs."""
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        if hogs:
            time.sleep(5)  # new processes are favoured by the scheduler at first: let that pass
        yield
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
