"""The output folder: read-only checks that say what changed, and the lock."""

import json
import os
import socket
import time

import pytest

from nemocc_dask import io
from nemocc_dask.output_folder import (LOCK, MANIFEST, OutputError, OutputLock, check_output,
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
