"""One function for a Dask client: a LocalCluster, a LocalCUDACluster, a SLURMCluster, or an existing
scheduler (address or scheduler file).

Every option has a default in ``nemocc.yaml`` registered under dask's config as ``nemocc`` (the way
dask-jobqueue does it), so ``nemocc.slurm.queue`` can be set in a dask YAML file or as
``DASK_NEMOCC__SLURM__QUEUE``; explicit arguments win.
"""

from __future__ import annotations

import logging
from pathlib import Path

import dask.config
import yaml

from nemocc_dask.errors import StartError
from nemocc_dask.gpu import require_gpu

_DEFAULTS = Path(__file__).with_name("nemocc.yaml")


def _register_defaults() -> None:
    with open(_DEFAULTS) as fh:
        defaults = yaml.safe_load(fh)
    dask.config.update_defaults(defaults)


_register_defaults()


class ClusterError(StartError):
    """The requested cluster cannot be started here; the message says why."""


def _option(name: str, value):
    return value if value is not None else dask.config.get(f"nemocc.{name}")


def slurm_cluster(**overrides):
    """A dask_jobqueue.SLURMCluster from the ``nemocc.slurm`` config plus ``overrides``."""
    try:
        from dask_jobqueue import SLURMCluster
    except ImportError:
        raise ClusterError("--cluster slurm needs dask-jobqueue: pip install 'nemocc_dask[slurm]'"
                           ) from None
    cfg = dict(dask.config.get("nemocc.slurm"))
    cfg.update({k.replace("_", "-"): v for k, v in overrides.items() if v is not None})
    kwargs = dict(queue=cfg["queue"], account=cfg["account"], walltime=cfg["walltime"],
                  cores=cfg["cores"], memory=cfg["memory"], processes=cfg["processes"],
                  interface=cfg["interface"], job_script_prologue=list(cfg["job-script-prologue"]),
                  job_extra_directives=list(cfg["job-extra-directives"]),
                  log_directory=cfg["log-directory"])
    if cfg.get("worker-command"):
        kwargs["worker_command"] = cfg["worker-command"]
    for key in ("scheduler-options", "python"):
        if cfg.get(key) is not None:
            kwargs[key.replace("-", "_")] = cfg[key]
    cluster = SLURMCluster(**{k: v for k, v in kwargs.items() if v is not None})
    cluster.scale(jobs=int(cfg["jobs"]))
    return cluster


def make_client(cluster: str | None = None, scheduler: str | None = None,
                scheduler_file: str | None = None, workers: int | None = None,
                threads_per_worker: int | None = None, worker_log_level: int = logging.WARNING,
                **slurm_options):
    """A ``distributed.Client`` for the chosen cluster (``local``, ``local-cuda``, ``slurm``) or
    for an existing scheduler. The caller closes it (``client.close(); client.cluster.close()``).
    ``worker_log_level``: what local workers log (the CLI raises it to CRITICAL without ``-v``,
    since it reports failed partitions itself).
    """
    from distributed import Client, LocalCluster

    scheduler = _option("scheduler", scheduler)
    scheduler_file = _option("scheduler-file", scheduler_file)
    if scheduler:
        return Client(scheduler)
    if scheduler_file:
        return Client(scheduler_file=scheduler_file)
    kind = _option("cluster", cluster)
    workers = _option("local.workers", workers)
    threads = _option("local.threads-per-worker", threads_per_worker)
    if kind == "local":
        return Client(LocalCluster(n_workers=workers, threads_per_worker=threads,
                                   memory_limit=dask.config.get("nemocc.local.memory-limit"),
                                   dashboard_address=None, silence_logs=worker_log_level))
    if kind == "local-cuda":
        require_gpu()
        from dask_cuda import LocalCUDACluster

        return Client(LocalCUDACluster(threads_per_worker=threads, dashboard_address=None))
    if kind == "slurm":
        return Client(slurm_cluster(**slurm_options))
    raise ClusterError(f"unknown cluster {kind!r}; choose local, local-cuda or slurm, or give "
                       "--scheduler ADDRESS / --scheduler-file PATH")
