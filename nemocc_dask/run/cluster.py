"""One function for a Dask client: a LocalCluster, a LocalCUDACluster, a SLURMCluster, or an existing
scheduler (address or scheduler file).

Every option has a default in ``nemocc.yaml`` registered under dask's config as ``nemocc`` (the way
dask-jobqueue does it), so ``nemocc.slurm.queue`` can be set in a dask YAML file or as
``DASK_NEMOCC__SLURM__QUEUE``; explicit arguments win.
"""

from __future__ import annotations

import logging

from nemocc_dask.config import setting
from nemocc_dask.errors import StartError
from nemocc_dask.io.gpu import require_gpu


class ClusterError(StartError):
    """The requested cluster cannot be started here; the message says why."""


# The dashboard is unauthenticated: a local cluster's listens on loopback only (reach it from
# elsewhere through an SSH tunnel)
LOCAL_DASHBOARD = "127.0.0.1:0"


def _option(name: str, value):
    return value if value is not None else setting(name)


def slurm_cluster(**overrides):
    """A dask_jobqueue.SLURMCluster from the ``nemocc.slurm`` config plus ``overrides``."""
    try:
        from dask_jobqueue import SLURMCluster
    except ImportError:
        raise ClusterError("--cluster slurm needs dask-jobqueue: pip install 'nemocc_dask[slurm]'"
                           ) from None
    cfg = dict(setting("slurm"))
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
    if cfg.get("adapt"):
        minimum, maximum = parse_adapt(cfg["adapt"])
        cluster.adapt(minimum_jobs=minimum, maximum_jobs=maximum)
    else:
        cluster.scale(jobs=int(cfg["jobs"]))
    return cluster


def parse_adapt(spec: str) -> tuple[int, int]:
    """``"MIN:MAX"`` worker jobs for an adaptive cluster; ClusterError when malformed."""
    try:
        minimum, maximum = (int(x) for x in str(spec).split(":"))
    except ValueError:
        raise ClusterError(f"--adapt takes MIN:MAX worker jobs, e.g. 1:8 (got {spec!r})") from None
    if not 0 <= minimum <= maximum or maximum < 1:
        raise ClusterError(f"--adapt MIN:MAX needs 0 <= MIN <= MAX and MAX >= 1 (got {spec!r})")
    return minimum, maximum


def wait_for_first_worker(client, timeout: float, where: str) -> None:
    """Block until the cluster has a worker; after ``timeout`` seconds close the client (and its
    cluster) and raise ClusterError saying where to look."""
    try:
        client.wait_for_workers(1, timeout=timeout)
    except TimeoutError:
        cluster = client.cluster
        client.close()
        if cluster is not None:
            cluster.close()
        raise ClusterError(
            f"no Dask worker joined within {timeout:.0f} s ({where}); raise the wait with "
            "DASK_NEMOCC__WORKER_START_TIMEOUT=SECONDS") from None


def make_client(cluster: str | None = None, scheduler: str | None = None,
                scheduler_file: str | None = None, workers: int | None = None,
                threads_per_worker: int | None = None, worker_log_level: int = logging.WARNING,
                **slurm_options):
    """A ``distributed.Client`` for the chosen cluster (``local``, ``local-cuda``, ``slurm``) or
    for an existing scheduler. The caller closes it (``client.close(); client.cluster.close()``).
    ``worker_log_level``: what local workers log (the CLI raises it to CRITICAL without ``-v``,
    since it reports failed partitions itself). A SLURM cluster (unless adaptive from 0) or an
    existing scheduler is returned once its first worker has joined (``worker-start-timeout``).
    """
    from distributed import Client, LocalCluster

    scheduler = _option("scheduler", scheduler)
    scheduler_file = _option("scheduler-file", scheduler_file)
    timeout = float(setting("worker-start-timeout"))
    if scheduler or scheduler_file:
        client = Client(scheduler) if scheduler else Client(scheduler_file=scheduler_file)
        wait_for_first_worker(client, timeout, "are the workers started and pointed at "
                                               f"{scheduler or scheduler_file}?")
        return client
    kind = _option("cluster", cluster)
    workers = _option("local.workers", workers)
    threads = _option("local.threads-per-worker", threads_per_worker)
    if kind == "local":
        if any(n is not None and not n >= 1 for n in (workers, threads)):
            raise ClusterError(f"a local cluster needs at least 1 worker and 1 thread per worker "
                               f"(got workers={workers}, threads_per_worker={threads})")
        return Client(LocalCluster(n_workers=workers, threads_per_worker=threads,
                                   memory_limit=setting("local.memory-limit"),
                                   host="127.0.0.1", dashboard_address=LOCAL_DASHBOARD,
                                   silence_logs=worker_log_level))
    if kind == "local-cuda":
        require_gpu()
        from dask_cuda import LocalCUDACluster

        return Client(LocalCUDACluster(threads_per_worker=threads, host="127.0.0.1",
                                       dashboard_address=LOCAL_DASHBOARD))
    if kind == "slurm":
        client = Client(slurm_cluster(**slurm_options))
        adapt = slurm_options.get("adapt") or setting("slurm.adapt")
        if not adapt or parse_adapt(adapt)[0] > 0:  # an adaptive cluster from 0 waits for work
            wait_for_first_worker(client, timeout, "check `squeue --me` for pending worker jobs "
                                                   "(queue, account, resources) and their logs")
        return client
    raise ClusterError(f"unknown cluster {kind!r}; choose local, local-cuda or slurm, or give "
                       "--scheduler ADDRESS / --scheduler-file PATH")
