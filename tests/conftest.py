"""Shared fixtures: the offline tokenizer, a 2-worker LocalCluster, the mock server, sample data."""

from __future__ import annotations

import logging
import os

import pandas as pd
import pytest

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(scope="session")
def tokenizer():
    from nemocc_dask.recipe.tokenizer import load_tokenizer

    return load_tokenizer()


@pytest.fixture(scope="session")
def cluster_client():
    """A real distributed LocalCluster with 2 worker processes (shared by the session)."""
    from distributed import Client, LocalCluster

    cluster = LocalCluster(n_workers=2, threads_per_worker=2, dashboard_address=None,
                           silence_logs=logging.WARNING)
    client = Client(cluster)
    yield client
    client.close()
    cluster.close()


@pytest.fixture
def mock_server():
    from nemocc_dask.testing.mock import MockLLMServer

    with MockLLMServer(latency=0.005) as server:
        yield server


def make_docs(n: int = 30, paragraphs: int = 4, start: int = 0) -> pd.DataFrame:
    """Documents of several "\\n"-separated paragraphs, long enough for every task."""
    sentence = ("The river delta supports {k} species of birds, and its wetlands filter water for "
                "the towns downstream during the dry season. ")
    texts = ["\n".join(sentence.format(k=i * 10 + p) * 3 for p in range(paragraphs))
             for i in range(start, start + n)]
    return pd.DataFrame({"id": list(range(start, start + n)), "text": texts,
                         "bucketed_results": [(i * 7) % 20 for i in range(start, start + n)]})


@pytest.fixture
def docs_parquet(tmp_path):
    """A parquet file of 60 documents in 6 row groups (so 3 partitions of 20 rows)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "docs.parquet"
    pq.write_table(pa.Table.from_pandas(make_docs(60), preserve_index=False), path,
                   row_group_size=10)
    return path


@pytest.fixture
def nemocc_config():
    """Set ``nemocc.*`` Dask config for one test (before its cluster starts, to reach the
    workers): ``nemocc_config({"lock.heartbeat-seconds": 0.1})``; undone at the end."""
    import contextlib

    import dask.config

    with contextlib.ExitStack() as stack:
        yield lambda values: stack.enter_context(
            dask.config.set({f"nemocc.{key}": value for key, value in values.items()}))
