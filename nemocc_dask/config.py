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
