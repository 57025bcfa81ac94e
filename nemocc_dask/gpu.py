"""The GPU switch: is a usable CUDA device here, and turning a Dask DataFrame's partitions into cuDF.

Every stage works on pandas and cuDF partitions alike (see ``nemocc_dask.stages.backend``), so
running on a GPU is only a matter of the collection's backend: ``to_gpu(ddf)`` or ``--gpu``.
Nothing here imports cuDF unless a GPU is asked for.
"""

from __future__ import annotations

import functools
import importlib.util
import os

from nemocc_dask.stages.backend import is_cudf


class GPUError(RuntimeError):
    """The GPU path was asked for but cannot run here; the message says why and what to do."""


def _gpu_packages_installed() -> bool:
    return all(importlib.util.find_spec(name) is not None
               for name in ("cudf", "dask_cudf", "dask_cuda"))


@functools.lru_cache(maxsize=None)
def gpu_available() -> bool:
    """True only if cuDF, dask-cudf and dask-cuda are installed and a CUDA device answers here.

    ``NEMOCC_DASK_FORCE_CPU=1`` makes it False (to test the CPU path on a GPU machine).
    """
    if os.environ.get("NEMOCC_DASK_FORCE_CPU") == "1" or not _gpu_packages_installed():
        return False
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            if pynvml.nvmlDeviceGetCount() == 0:
                return False
        finally:
            pynvml.nvmlShutdown()
        import cudf

        return int(cudf.Series([1, 2]).sum()) == 3
    except Exception:
        return False


def require_gpu() -> None:
    """Raise GPUError with the reason when the GPU path cannot run here (cheap; call it first)."""
    if not _gpu_packages_installed():
        raise GPUError("the GPU path (--gpu, --cluster local-cuda) needs cuDF, dask-cudf and "
                       "dask-cuda: pip install 'nemocc_dask[gpu]' (CUDA 12) or "
                       "'nemocc_dask[gpu-cu13]' (CUDA 13); or run without --gpu")
    if not gpu_available():
        raise GPUError("no usable CUDA device found (no NVIDIA driver or GPU visible to this "
                       "process, or NEMOCC_DASK_FORCE_CPU=1); run without --gpu / "
                       "--cluster local-cuda here")


def to_gpu(ddf):
    """``ddf`` with cuDF partitions (unchanged if it already has them); GPUError without a GPU."""
    require_gpu()
    if is_cudf(ddf._meta):
        return ddf
    return ddf.to_backend("cudf")
