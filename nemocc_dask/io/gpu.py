"""The GPU switch: is a usable CUDA device here, and turning a Dask DataFrame's partitions into cuDF.

Every stage works on pandas and cuDF partitions alike (see ``nemocc_dask.io.frames``), so
running on a GPU is only a matter of the collection's backend: ``to_gpu(ddf)`` or ``--gpu``.
Nothing here imports cuDF unless a GPU is asked for.
"""

from __future__ import annotations

import functools
import importlib.util
import os

from nemocc_dask.errors import StartError
from nemocc_dask.io.frames import is_cudf


class GPUError(StartError):
    """The GPU path was asked for but cannot run here; the message says why and what to do."""


def _gpu_packages_installed() -> bool:
    return all(importlib.util.find_spec(name) is not None
               for name in ("cudf", "dask_cudf", "dask_cuda"))


@functools.lru_cache(maxsize=None)
def gpu_problem() -> str | None:
    """Why the GPU path cannot run in this process, or None when it can.

    Tells apart: missing packages, ``NEMOCC_DASK_FORCE_CPU=1``, no NVIDIA driver or device, and a
    cuDF that is installed but fails to import or to run (a CUDA/ABI mismatch), with its error.
    """
    if os.environ.get("NEMOCC_DASK_FORCE_CPU") == "1":
        return "NEMOCC_DASK_FORCE_CPU=1 is set"
    if not _gpu_packages_installed():
        return ("the GPU path (--gpu, --cluster local-cuda) needs cuDF, dask-cudf and dask-cuda: "
                "pip install 'nemocc_dask[gpu]' (CUDA 12) or 'nemocc_dask[gpu-cu13]' (CUDA 13)")
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            count = pynvml.nvmlDeviceGetCount()
        finally:
            pynvml.nvmlShutdown()
    except Exception as exc:
        return f"no usable NVIDIA driver here ({type(exc).__name__}: {exc})"
    if count == 0:
        return "the NVIDIA driver sees no GPU"
    try:
        import cudf
    except Exception as exc:
        return (f"cuDF is installed but does not import ({type(exc).__name__}: {exc}); reinstall "
                "the [gpu] extra matching this machine's CUDA version")
    try:
        if int(cudf.Series([1, 2]).sum()) != 3:
            return "cuDF computed a wrong result on this device"
    except Exception as exc:
        return (f"cuDF imports but cannot run on the GPU ({type(exc).__name__}: {exc}); check "
                "that the [gpu] extra matches the driver's CUDA version")
    return None


def gpu_available() -> bool:
    """True only if cuDF, dask-cudf and dask-cuda are installed and a CUDA device answers here."""
    return gpu_problem() is None


def require_gpu() -> None:
    """Raise GPUError with the reason when the GPU path cannot run here (cheap; call it first)."""
    problem = gpu_problem()
    if problem is not None:
        raise GPUError(f"cannot use the GPU: {problem}; or run without --gpu / "
                       "--cluster local-cuda")


def to_gpu(ddf):
    """``ddf`` with cuDF partitions (unchanged if it already has them); GPUError without a GPU."""
    require_gpu()
    if is_cudf(ddf._meta):
        return ddf
    return ddf.to_backend("cudf")
