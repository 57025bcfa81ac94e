"""Quality routing: which documents of a partition go to the high- or the low-quality tasks."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from nemocc_dask.io.frames import series_like, to_host_list


@dataclass(frozen=True)
class Route:
    """Keep documents whose ``field`` is ``> threshold`` (``high``) or ``<= threshold`` (low)."""

    field: str
    threshold: float
    high: bool


def route_partition(df, route: Route | None) -> tuple[object, int]:
    """(the rows of ``df`` on ``route``, how many rows have a missing or non-numeric quality).

    Reads ``route.field`` (numbers or numeric strings; one host round trip); rows whose quality
    is not a number are on no route. ``route=None`` keeps every row.
    """
    if route is None:
        return df, 0
    values = pd.to_numeric(pd.Series(to_host_list(df[route.field]), dtype="object"),
                           errors="coerce")
    invalid = values.isna()
    chosen = (values > route.threshold) if route.high else (values <= route.threshold)
    mask = (chosen & ~invalid).tolist()
    return df[series_like(mask, df, dtype=bool)], int(invalid.sum())


def select_route(df, route: Route):
    """The rows of ``df`` on ``route`` (a partition function for ``map_partitions``)."""
    return route_partition(df, route)[0]
