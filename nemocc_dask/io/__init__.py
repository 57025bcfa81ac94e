"""The io layer: reading the input (parquet, JSONL, ``.jsonl.gz``; local or object storage) into
deterministic partitions, checking it (ids, one type per column), frames on pandas or cuDF, and
writing files atomically. It owns no recipe and knows nothing of LLMs or runs: it may import
only ``nemocc_dask.errors`` and ``nemocc_dask.config``.
"""

from nemocc_dask.io.checks import check_input, parquet_types
from nemocc_dask.io.files import (atomic_write_bytes, atomic_write_parquet, digest, file_digest,
                                  naming, remove_stale_temps, temp_name)
from nemocc_dask.io.readers import (DEFAULT_ROWS_PER_PARTITION, SAMPLE_PATH, InputError, Piece,
                                    cached_pieces, column_type, file_identities, frame_from_pieces,
                                    input_fingerprint, partition_map, read_input, read_piece)

__all__ = [
    "DEFAULT_ROWS_PER_PARTITION", "InputError", "Piece", "SAMPLE_PATH", "atomic_write_bytes",
    "atomic_write_parquet", "cached_pieces", "check_input", "column_type", "digest",
    "file_digest", "file_identities", "frame_from_pieces", "input_fingerprint", "naming",
    "parquet_types", "partition_map", "read_input", "read_piece", "remove_stale_temps",
    "temp_name",
]
