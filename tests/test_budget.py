"""The cluster-wide in-flight budget: the allocator's shares on scripted reports, and a real
LocalCluster whose workers come and go under one budget, sampled at the mock server."""

from __future__ import annotations

import logging
import threading
import time

import pytest

from nemocc_dask.llm.budget import (DEMAND_MEMORY_SECONDS, DEPARTED_SECONDS, STALE_SECONDS,
                                    Allocator, fair_shares)
from nemocc_dask.llm.config import LLMConfig
from nemocc_dask.llm.mock import MockLLMServer

from conftest import make_docs


def test_fair_shares_split_evenly_and_never_give_more_than_wanted():
    assert fair_shares({"a": 100, "b": 100}, 10) == {"a": 5, "b": 5}
    assert fair_shares({"a": 2, "b": 100, "c": 0}, 10) == {"a": 2, "b": 8, "c": 0}
    assert fair_shares({"a": 3, "b": 3, "c": 100}, 11) == {"a": 3, "b": 3, "c": 5}
    assert sum(fair_shares({"a": 9, "b": 9, "c": 9}, 10).values()) == 10
    # more busy holders than the budget: each still gets one (the documented tolerance)
    assert fair_shares({"a": 5, "b": 5, "c": 5}, 2) == {"a": 1, "b": 1, "c": 1}


def _report(alloc, holder, now, cap, in_flight, demand, total=16):
    return alloc.report("http://e/v1", holder, holder.split("/")[0], total, cap, in_flight,
                        demand, now)


def test_a_late_worker_gets_room_only_after_the_others_drain():
    alloc = Allocator()
    assert _report(alloc, "w1/p", 0.0, 0, 0, 100) == 16
    # w2 arrives while w1 may still have 16 in flight: nothing is free yet
    assert _report(alloc, "w2/p", 0.1, 0, 0, 100) == 0
    # w1 is told to shrink to its share; until it reports again its 16 still count
    assert _report(alloc, "w1/p", 0.2, 16, 16, 100) == 8
    assert _report(alloc, "w2/p", 0.3, 0, 0, 100) == 0
    # w1 reports it applied the cap and drained to 8: w2 gets the other half
    assert _report(alloc, "w1/p", 0.4, 8, 8, 100) == 8
    assert _report(alloc, "w2/p", 0.5, 0, 0, 100) == 8
    assert alloc.in_use("http://e/v1") == 16


def test_shrinking_counts_what_is_still_in_flight():
    alloc = Allocator()
    _report(alloc, "w1/p", 0.0, 0, 0, 100)
    _report(alloc, "w2/p", 0.1, 0, 0, 100)
    _report(alloc, "w1/p", 0.2, 16, 16, 100)  # granted 8
    # w1 applied cap 8 but 12 are still on the wire: only 4 are free
    _report(alloc, "w1/p", 0.3, 8, 12, 100)
    assert _report(alloc, "w2/p", 0.4, 0, 0, 100) == 4


def test_idle_holders_give_their_room_to_busy_ones():
    alloc = Allocator()
    _report(alloc, "w1/p", 0.0, 0, 0, 100)
    _report(alloc, "w2/p", 0.1, 0, 0, 100)
    _report(alloc, "w1/p", 0.2, 16, 16, 100)
    _report(alloc, "w1/p", 0.3, 8, 8, 100)
    assert _report(alloc, "w2/p", 0.4, 0, 0, 100) == 8
    # a dip in w2's demand shorter than DEMAND_MEMORY_SECONDS (between two partitions) keeps
    # its share
    assert _report(alloc, "w2/p", 0.5, 8, 0, 0) == 8
    assert _report(alloc, "w1/p", 0.6, 8, 8, 100) == 8
    # w2 ran out of work for good: once the memory has passed its room goes to w1, but only
    # after w2 reports that it applied its new cap
    assert _report(alloc, "w2/p", 0.5 + DEMAND_MEMORY_SECONDS + 0.1, 8, 0, 0) == 0
    assert _report(alloc, "w1/p", 1.7, 8, 8, 100) == 8  # w2 may still use 8 until it reports
    assert _report(alloc, "w2/p", 1.8, 0, 0, 0) == 0
    assert _report(alloc, "w1/p", 1.9, 8, 8, 100) == 16


def test_departed_and_silent_holders_give_their_room_back():
    alloc = Allocator()
    _report(alloc, "w1/p", 0.0, 0, 0, 100)
    assert _report(alloc, "w2/p", 0.1, 0, 0, 100) == 0
    alloc.forget_worker("w1", 0.15)  # its last requests may still be on the wire for a moment
    assert _report(alloc, "w2/p", 0.2, 0, 0, 100) == 0
    assert _report(alloc, "w2/p", 0.15 + DEPARTED_SECONDS + 0.1, 0, 0, 100) == 16
    # w2 goes silent (e.g. its process hangs): after STALE_SECONDS its room is free again
    last = 0.15 + DEPARTED_SECONDS + 0.1
    assert _report(alloc, "w3/p", last, 0, 0, 100) == 0
    assert _report(alloc, "w3/p", last + STALE_SECONDS + 1, 0, 0, 100) == 16


def test_holders_with_different_budgets_share_the_smallest():
    alloc = Allocator()
    assert _report(alloc, "w1/p", 0.0, 0, 0, 100, total=32) == 32
    assert _report(alloc, "w1/q", 0.1, 0, 0, 100, total=8) == 0
    assert _report(alloc, "w1/p", 0.2, 32, 0, 100, total=32) == 4


@pytest.mark.slow
def test_workers_joining_and_leaving_never_exceed_the_budget(tmp_path):
    """A 2-worker cluster, a third worker joining mid-run and one leaving: the mock server never
    sees more than max_in_flight at once, and reaches it."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from distributed import Client, LocalCluster

    from nemocc_dask.runner import run_to_parquet

    path = tmp_path / "docs.parquet"
    pq.write_table(pa.Table.from_pandas(make_docs(480, paragraphs=1), preserve_index=False), path)
    budget = 12
    cluster = LocalCluster(n_workers=2, threads_per_worker=4, dashboard_address=None,
                           silence_logs=logging.ERROR)
    client = Client(cluster)
    sizes = []

    def change_workers():
        time.sleep(3)
        cluster.scale(3)
        client.wait_for_workers(3, timeout=30)
        sizes.append(len(client.scheduler_info(n_workers=-1)["workers"]))
        time.sleep(3)
        client.retire_workers([sorted(client.scheduler_info(n_workers=-1)["workers"])[0]])
        sizes.append(len(client.scheduler_info(n_workers=-1)["workers"]))

    try:
        with MockLLMServer(latency=0.25, track_in_flight=True) as server:
            changer = threading.Thread(target=change_workers)
            changer.start()
            report = run_to_parquet(path, tmp_path / "out", "distill",
                                    LLMConfig(base_url=server.base_url, model="mock",
                                              max_in_flight=budget),
                                    rows_per_partition=20, show_progress=False)
            changer.join()
    finally:
        client.close()
        cluster.close()
    assert sizes == [3, 2], "the cluster did not change size while the run was going"
    # a partition on the retired worker may be redone elsewhere, reusing its journaled answers
    assert report["accounted"] and report["documents_in"] == 480
    assert report["requests"] + report["reused_answers"] >= 480
    assert server.stats.max_in_flight <= budget
    assert server.stats.max_in_flight == budget
