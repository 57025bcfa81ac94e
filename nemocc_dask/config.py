"""The package's settings in Dask's config under ``nemocc.*``: the defaults in ``nemocc.yaml`` are
registered here, once, the way dask-jobqueue registers its own, so any of them can be set in a
Dask YAML file or as ``DASK_NEMOCC__...`` environment variables. Every layer may import this
module (and ``errors``); it imports nothing of the package.
"""

from __future__ import annotations

from pathlib import Path

import dask.config
import yaml

DEFAULTS = Path(__file__).with_name("nemocc.yaml")


def _register_defaults() -> None:
    with open(DEFAULTS) as fh:
        dask.config.update_defaults(yaml.safe_load(fh))


_register_defaults()


_REQUIRED = object()


def setting(key: str, default=_REQUIRED):
    """The value of ``nemocc.<key>`` (dotted, e.g. ``"lock.heartbeat-seconds"``): the packaged
    default from ``nemocc.yaml`` unless set in Dask config or a ``DASK_NEMOCC__...`` variable
    (``default`` for a key that has none there). Read where it is used, so a value set before a
    cluster starts reaches its workers."""
    if default is _REQUIRED:
        return dask.config.get(f"nemocc.{key}")
    return dask.config.get(f"nemocc.{key}", default)
