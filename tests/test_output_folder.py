"""The output folder: read-only checks that say what changed, and the lock."""

import json
import os
import socket
import time

import pytest

from nemocc_dask import io
from nemocc_dask.run.output_folder import (LOCK, MANIFEST, OutputError, OutputLock, check_output,
                                           prepare_output)


def _material(partitions=3, seed=0):
    return {"inputs": {"files": [["/d.parquet", 10, 1]],
                       "partitions": [["/d.parquet", "parquet", i, i + 1]
                                      for i in range(partitions)]},
            "task": {"name": "distill"}, "llm": {"model": "m"}, "settings": {}, "tokenizer": "t",
            "seed": seed, "id_field": "id", "route": None}


def test_checks_change_nothing_and_name_what_changed(tmp_path):
    out = tmp_path / "out"
    assert check_output(out, _material(), False) == "new" and not out.exists()
    with OutputLock(out):
        prepare_output(out, _material(), "new")
    assert check_output(out, _material(), False) == "resume"
    with pytest.raises(OutputError, match="partition map .3 partitions before, 6 now"):
        check_output(out, _material(partitions=6), False)
    with pytest.raises(OutputError, match="the seed"):
        check_output(out, _material(seed=1), False)
    before = (out / MANIFEST).read_bytes()
    assert check_output(out, _material(seed=1), True) == "replace"
    assert (out / MANIFEST).read_bytes() == before and not (out / LOCK).exists()


def test_live_lock_refuses_a_second_run_and_a_dead_one_is_taken_over(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / MANIFEST).write_text(json.dumps({"fingerprint": io.digest(_material()),
                                            "material": _material()}))
    live = {"host": "othernode", "pid": 4242, "heartbeat": time.time()}
    (out / LOCK).write_text(json.dumps(live))
    with pytest.raises(OutputError, match="host othernode, pid 4242"):
        check_output(out, _material(), False)
    with pytest.raises(OutputError):
        OutputLock(out).__enter__()
    old = dict(live, heartbeat=time.time() - 3600)  # no heartbeat for an hour: stale
    (out / LOCK).write_text(json.dumps(old))
    os.utime(out / LOCK, (time.time() - 3600, time.time() - 3600))
    with OutputLock(out):
        held = json.loads((out / LOCK).read_text())
        assert held["pid"] == os.getpid() and held["host"] == socket.gethostname()
    assert not (out / LOCK).exists()


def _try_the_lock(out, start_at, results):
    """In a child process: wait for the common instant, try the lock, hold it a moment."""
    while time.time() < start_at:
        pass
    try:
        with OutputLock(out):
            results.put(os.getpid())
            time.sleep(0.5)
    except OutputError:
        results.put(None)


def test_runs_starting_at_the_same_instant_never_both_take_the_lock(tmp_path):
    import multiprocessing

    context = multiprocessing.get_context("fork")
    for trial in range(5):
        out = tmp_path / f"out{trial}"
        results = context.Queue()
        start_at = time.time() + 0.5
        procs = [context.Process(target=_try_the_lock, args=(out, start_at, results))
                 for _ in range(8)]
        for proc in procs:
            proc.start()
        winners = [results.get(timeout=30) for _ in procs]
        for proc in procs:
            proc.join(timeout=30)
        assert sum(w is not None for w in winners) == 1, (trial, winners)
        assert not (out / LOCK).exists()


def test_a_live_process_on_this_host_is_never_taken_over_however_old_its_heartbeat(tmp_path):
    import subprocess

    from nemocc_dask.run.output_folder import _process_started

    out = tmp_path / "out"
    out.mkdir()
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        paused = {"host": socket.gethostname(), "pid": sleeper.pid,
                  "started": _process_started(sleeper.pid), "heartbeat": time.time() - 3600}
        (out / LOCK).write_text(json.dumps(paused))  # a driver paused for an hour
        os.utime(out / LOCK, (time.time() - 3600, time.time() - 3600))
        with pytest.raises(OutputError, match=f"pid {sleeper.pid}"):
            OutputLock(out).__enter__()
        # the same PID number, but another process (a reused PID): the lock is stale
        (out / LOCK).write_text(json.dumps(dict(paused, started="1")))
        with OutputLock(out):
            assert json.loads((out / LOCK).read_text())["pid"] == os.getpid()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_run_whose_lock_was_taken_stops_and_never_rewrites_it(tmp_path, nemocc_config):
    nemocc_config({"lock.heartbeat-seconds": 0.1})
    out = tmp_path / "out"
    lost = []
    lock = OutputLock(out, on_lost=lost.append)
    with lock:
        other = {"host": "othernode", "pid": 7, "token": "theirs", "heartbeat": time.time()}
        (out / LOCK).write_text(json.dumps(other))  # another run took it (e.g. by hand)
        deadline = time.time() + 5
        while not lost and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)  # more beats would have rewritten it by now
        assert json.loads((out / LOCK).read_text())["token"] == "theirs"
    assert lost and "host othernode, pid 7" in lost[0] and "stopped sending" in lost[0]
    assert json.loads((out / LOCK).read_text())["token"] == "theirs"  # not removed either


def test_a_run_started_before_generation_settings_moved_into_the_task_still_resumes(tmp_path):
    """A run started when ``--temperature`` lived in LLMConfig recorded the task preset's default
    there and the override in ``settings`` only; the same command now puts the override in the
    task too. It is the same run (``settings``, what is sent, is unchanged); another temperature
    is not."""
    from pathlib import Path

    from nemocc_dask import LLMConfig, get_preset
    from nemocc_dask.recipe.presets import PRESETS
    from nemocc_dask.run.start import Job, fingerprint

    def material(temperature):
        job = Job(get_preset("distill", temperature=temperature),
                  LLMConfig(base_url="http://127.0.0.1:1/v1", model="m"), Path(tmp_path))
        return json.loads(json.dumps(fingerprint(job, {"files": []}, None, 0, "id"),
                                     default=str))

    now = material(0.3)
    before = {**now, "task": {**now["task"], "temperature": PRESETS["distill"].temperature}}
    assert before != now and before["settings"]["temperature"] == 0.3
    out = tmp_path / "out"
    with OutputLock(out):
        prepare_output(out, before, "new")
    assert check_output(out, now, False) == "resume"
    with pytest.raises(OutputError, match="holds a run with different"):
        check_output(out, material(0.4), False)
