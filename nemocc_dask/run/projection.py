"""``plan``'s arithmetic: the counts of the sampled partitions and the probe's measurements
projected over the whole input (requests, tokens, rows, bytes, wall time, GPU-hours, cost), each
sampled figure with a 95% interval. Pure functions of plain dicts (``run.sample``'s results).
"""

from __future__ import annotations

import math
import statistics
from collections import Counter

from nemocc_dask.run.ledger import cost

Z95 = 1.96


def _interval(value: float, half_width: float) -> list[float]:
    return [round(max(0.0, value - half_width), 1), round(value + half_width, 1)]


def answer_rate(probes: list[dict]) -> float | None:
    """Answers per second while the probe was sending: its answers over the time from its first
    request on the wire (after the workers built their pools) to its last answer; None with
    under 2 answers."""
    times = [t for p in probes for t in p["answer_times"]]
    starts = [p["first_sent"] for p in probes if p.get("first_sent") is not None]
    if len(times) < 2 or not starts:
        return None
    span = max(times) - min(starts)
    return len(times) / span if span > 0 else None


def _ramp(probes: list[dict]) -> tuple[int, float]:
    """(answers, seconds) of the probe's rounds before its last: the window growing."""
    last = max((p.get("round", 0) for p in probes), default=0)
    answers, seconds = 0, 0.0
    for number in range(last):
        done = [p for p in probes if p.get("round", 0) == number]
        rate = answer_rate(done)
        count = sum(len(p["answer_times"]) for p in done)
        answers += count
        seconds += count / rate if rate else 0.0
    return answers, seconds


def pool_start_seconds(probes: list[dict]) -> float:
    """Seconds from the probe's first tasks starting to send to their first request on the wire
    (the workers' pools being built: the run pays it once too)."""
    waits = [p["first_sent"] - p["sent_at"] for p in probes
             if p.get("first_sent") is not None and p.get("round", 0) == 0]
    return max(0.0, min(waits)) if waits else 0.0


def task_projection(counts: list[dict], probes: list[dict], total_rows: int,
                    max_tokens: int, max_input_tokens: int, served_context: int | None) -> dict:
    """One task's projection from its sampled partitions' ``counts`` and its ``probes``
    (``run.sample``), over an input of ``total_rows`` rows."""
    sampled_rows = sum(c["input_rows"] for c in counts)
    scale = total_rows / sampled_rows if sampled_rows else 0.0
    exact = sampled_rows == total_rows
    summed = Counter()
    for c in counts:
        summed.update({k: c[k] for k in ("documents", "segments", "requests", "prompt_tokens",
                                          "answered")})
    documents = summed["documents"] * scale
    requests = summed["requests"] * scale
    # per-document requests: the interval of the total when only a sample was counted
    n = summed["documents"]
    total_sq = sum(c["requests_per_document"][1] for c in counts)
    variance = max(0.0, total_sq / n - (summed["requests"] / n) ** 2) if n else 0.0
    finite = max(0.0, 1 - n / documents) if documents else 0.0
    requests_se = 0.0 if exact else documents * math.sqrt(variance / n * finite) if n else 0.0
    out = {"documents": round(documents), "segments": round(summed["segments"] * scale),
           "requests": round(requests), "requests_interval": _interval(requests,
                                                                       Z95 * requests_se),
           "prompt_tokens": round(summed["prompt_tokens"] * scale)}
    not_sent = Counter()
    for c in counts:
        not_sent.update(c["not_sent"])
    answered = summed["answered"] * scale + sum(p["answers"] for p in probes)
    out["requests_answered"] = round(min(requests, answered))
    out["requests_to_send"] = round(max(0.0, requests - answered))
    longest = max((c["max_prompt_tokens"] for c in counts), default=0)
    out["context"] = {"served": served_context, "task_needs": max_input_tokens + max_tokens,
                      "longest_prompt_seen": longest,
                      "longest_request_seen": longest + max_tokens,
                      "fits": served_context is None
                      or served_context >= max_input_tokens + max_tokens,
                      "prompts_too_long": round(not_sent.get("prompt_too_long", 0) * scale)}
    out.update(_answer_projection(probes, requests, requests_se, dict(not_sent), scale))
    return out


def _answer_projection(probes: list[dict], requests: float, requests_se: float,
                       not_sent: dict, scale: float) -> dict:
    """Completion tokens, rows kept and rejected, bytes on disk: the probe's ratios times the
    projected requests (only the rows not sent, counted exactly, without a probe)."""
    tokens = [t for p in probes for t in p["completion_tokens"]]
    rejected = Counter({reason: n * scale for reason, n in not_sent.items()})
    if not tokens:
        return {"completion_tokens": None, "rows_expected": None,
                "rows_rejected_expected": {k: round(v) for k, v in rejected.items()},
                "output_bytes": None}
    per_answer = statistics.fmean(tokens)
    spread = statistics.stdev(tokens) if len(tokens) > 1 else 0.0
    completion = per_answer * requests
    completion_se = math.hypot(requests * spread / math.sqrt(len(tokens)),
                               per_answer * requests_se)
    rows_sent = sum(p["rows_sent"] for p in probes) or 1
    kept = sum(p["rows_kept"] for p in probes)
    for p in probes:  # the probe's own rows not sent are already counted, from every row
        rejected.update({reason: n / rows_sent * requests for reason, n in
                         p["rows_rejected"].items() if reason not in not_sent})
    rows = kept / rows_sent * requests
    kept_bytes = sum(p["kept_bytes"] for p in probes) / max(kept, 1)
    reject_rows = sum(p["rejected_rows"] for p in probes)
    reject_bytes = sum(p["rejected_bytes"] for p in probes) / max(reject_rows, 1)
    return {"completion_tokens": round(completion),
            "completion_tokens_interval": _interval(completion, Z95 * completion_se),
            "completion_tokens_per_answer": round(per_answer, 1),
            "rows_expected": round(rows),
            "rows_rejected_expected": {k: round(v) for k, v in sorted(rejected.items())},
            "rejection_rate": round(1 - kept / rows_sent, 4),
            "output_bytes": round(rows * kept_bytes + sum(rejected.values()) * reject_bytes)}


def run_projection(tasks: dict[str, dict], counts: list[dict], probes: list[dict], *,
                   total_rows: int, partitions: int, slots: int, startup_seconds: float,
                   endpoints_probed: int, endpoints: int, gpus_per_endpoint: float,
                   price_input: float | None, price_output: float | None) -> dict:
    """The whole run from the tasks' projections: wall time (start-up and the pools' start,
    the requests still to send at the probe's answer rates (its window growing, then its last
    round's rate) scaled to ``endpoints``, and the CPU stages over ``slots`` partitions at
    once), GPU-hours and cost."""
    total = {key: sum(t[key] or 0 for t in tasks.values()) for key in
             ("requests", "requests_to_send", "prompt_tokens", "completion_tokens",
              "rows_expected", "output_bytes")}
    last = max((p.get("round", 0) for p in probes), default=0)
    rate = answer_rate([p for p in probes if p.get("round", 0) == last])
    sampled_rows = sum(c["input_rows"] for c in counts) or 1
    cpu = sum(c["preprocess_seconds"] for c in counts) * total_rows / sampled_rows
    probe_rows = sum(p["rows_sent"] for p in probes)
    if probe_rows:
        cpu += sum(p["postprocess_seconds"] for p in probes) / probe_rows * total["requests"]
    total["answers_per_second"] = round(rate, 2) if rate else None
    total["endpoints"], total["gpus_per_endpoint"] = endpoints, gpus_per_endpoint
    total["cpu_seconds"] = round(cpu, 1)
    if rate:
        speed = endpoints / max(endpoints_probed, 1)
        ramp_requests, ramp_seconds = _ramp(probes)
        to_send = total["requests_to_send"]
        if to_send >= ramp_requests:  # the run's window grows as the probe's did, then holds
            sending = (ramp_seconds + (to_send - ramp_requests) / rate) / speed
        else:
            sending = to_send * ramp_seconds / max(ramp_requests, 1) / speed
        wall = startup_seconds + pool_start_seconds(probes) + sending + cpu / max(slots, 1)
        total["wall_seconds"] = round(wall, 1)
        total["wall_hours"] = round(wall / 3600, 3)
        total["gpu_hours"] = round(wall / 3600 * endpoints * gpus_per_endpoint, 3)
    else:
        total["wall_seconds"] = total["wall_hours"] = total["gpu_hours"] = None
    spent = cost(total["prompt_tokens"], total["completion_tokens"], price_input, price_output)
    total["cost"] = None if spent is None else round(spent, 2)
    return total
