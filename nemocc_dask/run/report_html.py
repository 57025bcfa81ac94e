"""``report.html``: one self-contained page per task folder (plots inline as SVG, no script, no
network), written while the run goes (every ``nemocc.report-refresh-seconds``, from the
partitions finished so far) and once more at the end. Sections: throughput and window against the
server's queue over time per endpoint, errors over time and by class, rows kept and rejected by
reason, token-length histograms of segments and answers, example rows, the plan's projection
against the run.
"""

from __future__ import annotations

import html
import io as bytes_io
import json
import time
from pathlib import Path

from nemocc_dask.config import setting
from nemocc_dask.io import atomic_write_bytes

SECTIONS = ("throughput", "errors", "rows", "tokens", "examples", "plan")
EXAMPLES = 5


def _svg(figure) -> str:
    """A matplotlib figure as inline SVG (closed afterwards)."""
    import matplotlib.pyplot as plt

    sink = bytes_io.StringIO()
    figure.savefig(sink, format="svg", bbox_inches="tight")
    plt.close(figure)
    text = sink.getvalue()
    return text[text.index("<svg"):]


def _figure(width: float = 8, height: float = 3):
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(width, height))


def _table(rows: list[tuple]) -> str:
    cells = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in row) + "</tr>"
                    for row in rows)
    return f"<table>{cells}</table>"


def _throughput(report: dict, samples: list[dict]) -> str:
    series = report.get("endpoint_series", {})
    if not series:
        return "<p>No answers recorded per endpoint yet.</p>"
    parts = []
    for name, points in series.items():
        fig, ax = _figure()
        start = points[0]["t"] if points else 0
        ax.plot([p["t"] - start for p in points], [p["req_per_s"] for p in points],
                label="answers/s", color="tab:blue", marker="o" if len(points) < 30 else None)
        ax.set_xlabel("seconds since the first answer")
        ax.set_ylabel("answers/s")
        right = ax.twinx()
        right.step([p["t"] - start for p in points], [p["window"] for p in points],
                   where="post", label="window", color="tab:orange")
        queue = [(s["t"] - start, s["endpoints"][name]["queue"]) for s in samples
                 if s["endpoints"].get(name, {}).get("queue") is not None]
        if queue:
            right.plot(*zip(*queue), label="server queue", color="tab:red")
        right.set_ylabel("requests")
        fig.legend(loc="upper right")
        ax.set_title(name)
        parts.append(_svg(fig))
    return "".join(parts)


def _errors(report: dict) -> str:
    failed = list(report.get("failed_by_class", {}).items()) or [("none", 0)]
    retried = list(report.get("retries_by_class", {}).items()) or [("none", 0)]
    out = _table([("failed requests, by class", "")] + failed
                 + [("retries, by class", "")] + retried)
    series = report.get("endpoint_series", {})
    if any(p["errors"] for points in series.values() for p in points):
        fig, ax = _figure()
        for name, points in series.items():
            start = points[0]["t"] if points else 0
            ax.plot([p["t"] - start for p in points], [p["errors"] for p in points], label=name)
        ax.set_xlabel("seconds since the first answer")
        ax.set_ylabel("errors per interval")
        ax.legend()
        out += _svg(fig)
    else:
        out += "<p>No request failed on any endpoint.</p>"
    return out


def _rows(report: dict) -> str:
    rejected = report.get("rows_rejected", {})
    labels = ["kept"] + list(rejected)
    values = [report.get("rows_written", 0)] + list(rejected.values())
    fig, ax = _figure(8, 0.4 * len(labels) + 1)
    ax.barh(labels, values, color=["tab:green"] + ["tab:red"] * len(rejected))
    ax.invert_yaxis()
    ax.set_xlabel("rows")
    return _svg(fig) + _table(list(zip(labels, values)))


def _parts_sample(out_dir: Path, column_sets: list[str], limit: int = 20000):
    """Up to ``limit`` written rows (the columns that exist of ``column_sets``)."""
    import pandas as pd

    frames, rows = [], 0
    for path in sorted((out_dir / "parts").glob("*.parquet")):
        frame = pd.read_parquet(path)
        frames.append(frame[[c for c in column_sets if c in frame.columns]])
        rows += len(frame)
        if rows >= limit:
            break
    return pd.concat(frames, ignore_index=True) if frames else None


def _tokens(rows) -> str:
    if rows is None or not len(rows):
        return "<p>No rows written yet.</p>"
    out = ""
    for column, label in (("segment_token_count", "segment tokens"),
                          ("output_token_count", "answer tokens (after post-processing)")):
        if column in rows.columns:
            fig, ax = _figure(8, 2.5)
            ax.hist(rows[column].dropna(), bins=40, color="tab:blue")
            ax.set_xlabel(label)
            ax.set_ylabel("rows")
            out += _svg(fig)
    return out


def _examples(rows, input_field: str, output_field: str) -> str:
    if rows is None or not len(rows) or output_field not in rows.columns:
        return "<p>No rows written yet.</p>"
    picked = rows.head(EXAMPLES)
    body = "".join(
        f"<tr><td><pre>{html.escape(str(row.get(input_field, ''))[:1500])}</pre></td>"
        f"<td><pre>{html.escape(str(row[output_field])[:1500])}</pre></td></tr>"
        for _, row in picked.iterrows())
    return (f"<table class='examples'><tr><th>input ({html.escape(input_field)})</th>"
            f"<th>output ({html.escape(output_field)})</th></tr>{body}</table>")


def _plan(report: dict, plan: dict | None) -> str:
    if not plan or report.get("task") not in plan.get("tasks", {}):
        return "<p>No plan.json for this run (<code>nemocc-dask plan</code> writes one).</p>"
    task = plan["tasks"][report["task"]]
    rows = [("", "planned", "happened"),
            ("requests", task["requests"], report.get("requests")),
            ("prompt tokens", task["prompt_tokens"], report.get("prompt_tokens")),
            ("completion tokens", task.get("completion_tokens"), report.get("completion_tokens")),
            ("rows written", task.get("rows_expected"), report.get("rows_written")),
            ("wall seconds (all tasks of the run)", plan["total"].get("wall_seconds"),
             report.get("wall_seconds"))]
    return _table(rows)


def render(report: dict, out_dir: Path, samples: list[dict], plan: dict | None,
           input_field: str, output_field: str, final: bool) -> str:
    """The page for one task folder."""
    rows = _parts_sample(out_dir, [input_field, output_field, "segment_token_count",
                                   "output_token_count"])
    bodies = {"throughput": _throughput(report, samples), "errors": _errors(report),
              "rows": _rows(report), "tokens": _tokens(rows),
              "examples": _examples(rows, input_field, output_field),
              "plan": _plan(report, plan)}
    titles = {"throughput": "Throughput and window against the server's queue",
              "errors": "Errors and retries", "rows": "Rows kept and rejected",
              "tokens": "Token lengths", "examples": "Example rows",
              "plan": "The plan against the run"}
    seconds = setting("report-refresh-seconds")
    state = "final" if final else f"live, refreshed every {seconds:.0f} s"
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    head = (f"<h1>nemocc-dask: task {html.escape(str(report.get('task', '')))}</h1>"
            f"<p>{state}; written {stamp}; {report.get('partitions', 0)} partitions, "
            f"{report.get('rows_written', 0)} rows written, {report.get('requests', 0)} "
            f"requests, {report.get('wall_seconds', 0)} s</p>")
    sections = "".join(f"<section id='{key}'><h2>{titles[key]}</h2>{bodies[key]}</section>"
                       for key in SECTIONS)
    refresh = "" if final else f"<meta http-equiv='refresh' content='{seconds:.0f}'>"
    style = ("body{font-family:sans-serif;max-width:60em;margin:auto}td{padding:0 1em}"
             "pre{white-space:pre-wrap;max-height:20em;overflow:auto;margin:0}"
             ".examples td{vertical-align:top;width:50%;border-top:1px solid #ccc}")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'>{refresh}"
            f"<title>nemocc-dask report</title><style>{style}</style></head>"
            f"<body>{head}{sections}</body></html>")


def read_plan(out_dir: Path) -> dict | None:
    """The plan.json of this folder's run (in the folder, or the pipeline's folder above)."""
    for path in (out_dir / "plan.json", out_dir.parent / "plan.json"):
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            continue
    return None


def write_report_html(out_dir: Path, report: dict, samples: list[dict], input_field: str,
                      output_field: str, final: bool = True) -> Path:
    """Write ``out_dir/report.html`` from ``report`` (report.json's content, or the figures so
    far) and the progress ``samples``; returns its path."""
    page = render(report, out_dir, samples, read_plan(out_dir), input_field, output_field, final)
    path = out_dir / "report.html"
    atomic_write_bytes(path, page.encode("utf-8"))
    return path
