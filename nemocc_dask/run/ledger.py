"""The cost and GPU-hour ledger of ``report.json``: this run's and the folder's cumulative
tokens, wall time, GPU-hours (wall x endpoints x GPUs per endpoint) and cost (prices per million
prompt and completion tokens). Prices and GPUs come from ``nemocc.ledger.*`` in Dask config, else
from the folder's ``plan.json`` (what ``plan`` was given); without prices the cost is None.
"""

from __future__ import annotations

from nemocc_dask.config import setting


def ledger_settings(plan: dict | None) -> dict:
    """Prices and GPUs per endpoint: Dask config first, then the plan's settings."""
    planned = (plan or {}).get("settings", {})
    settings = {}
    for key, plan_key, default in (("price-input", "price_input", None),
                                   ("price-output", "price_output", None),
                                   ("gpus-per-endpoint", "gpus_per_endpoint", 1.0)):
        value = setting(f"ledger.{key}", None)
        settings[plan_key] = float(value) if value is not None else planned.get(plan_key, default)
    return settings


def cost(prompt: float, completion: float, price_input: float | None,
         price_output: float | None) -> float | None:
    """What ``prompt`` and ``completion`` tokens cost at prices per million tokens (None
    without any price)."""
    if price_input is None and price_output is None:
        return None
    return prompt / 1e6 * (price_input or 0) + completion / 1e6 * (price_output or 0)


def _entry(prompt: int, completion: int, wall: float, endpoints: int, settings: dict) -> dict:
    gpu_hours = wall / 3600 * endpoints * (settings["gpus_per_endpoint"] or 1.0)
    spent = cost(prompt, completion, settings["price_input"], settings["price_output"])
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "wall_seconds": round(wall, 3), "endpoints": endpoints,
            "gpu_hours": round(gpu_hours, 4), "cost": None if spent is None else round(spent, 4)}


def ledger(report: dict, endpoints: int, plan: dict | None) -> dict:
    """``{"settings", "this_run", "cumulative"}`` for a report that has ``this_run`` and
    ``runs`` (``report.with_history``); ``endpoints``: the run's endpoint count."""
    settings = ledger_settings(plan)
    mine = report["this_run"]
    runs = report.get("runs", [mine])
    return {"settings": settings,
            "this_run": _entry(mine["prompt_tokens"], mine["completion_tokens"],
                               mine["wall_seconds"], endpoints, settings),
            "cumulative": _entry(sum(r.get("prompt_tokens", 0) for r in runs),
                                 sum(r.get("completion_tokens", 0) for r in runs),
                                 sum(r.get("wall_seconds", 0) for r in runs), endpoints,
                                 settings)}
