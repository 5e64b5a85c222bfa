"""spark-submit pipelines/runs.py list | show RUN_ID

Print the run records from the `runs` and `metrics` Delta tables under lake.path: `list` gives one
line per run (its newest state, newest run first), `show` one JSON object with every row of the run
and its metrics as [step, value] series.
"""
from __future__ import annotations

if __package__ in (None, ""):  # run as a script by spark-submit: make the project importable
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import json
from collections import defaultdict
from typing import Any

from pyspark.sql import functions as F

from pipelines.core.cli import add_verbose, main_wrapper, print_summary
from pipelines.core.config import DEFAULT_FILE, load_config
from pipelines.core.session import build_session
from pipelines.store import records

COLUMNS = ("run_id", "run_name", "status", "attempt", "strategy", "data", "started_at", "ended_at",
           "result")


def parse_args(argv: list[str]) -> argparse.Namespace:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", help="job config whose lake.path applies "
                        "(default: conf/default.yaml)")
    common.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set lake.path=/data/lake")
    add_verbose(common)
    p = argparse.ArgumentParser(prog="runs.py", description=__doc__.split("\n\n")[1])
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("list", parents=[common], help="one line per run, newest first")
    sub.add_parser("show", parents=[common], help="one run's records and metrics as JSON"
                   ).add_argument("run_id")
    return p.parse_args(argv)


def _result(metrics: dict[str, float] | None) -> str:
    metrics = metrics or {}
    for key in ("test_accuracy", "test_rmse"):
        if key in metrics:
            return f"{key}={metrics[key]:.4f}"
    return ""


def list_lines(rows: list[dict[str, Any]]) -> list[str]:
    """A fixed-width table: a header, then one line per run."""
    cells = [[str(r["run_id"]), r["run_name"] or "", r["status"], str(r["attempt"]), r["strategy"],
              f"{r['data_table']}@{r['data_version']}",
              r["started_at"].strftime("%Y-%m-%d %H:%M:%S") if r["started_at"] else "",
              r["ended_at"].strftime("%Y-%m-%d %H:%M:%S") if r["ended_at"] else "",
              _result(r["metrics"])] for r in rows]
    widths = [max(len(c) for c in col) for col in zip(COLUMNS, *cells, strict=False)]
    return ["  ".join(c.ljust(w) for c, w in zip(line, widths, strict=False)).rstrip()
            for line in [list(COLUMNS), *cells]]


def show(run_rows: list[dict[str, Any]], metric_rows: list[dict[str, Any]]) -> dict[str, Any]:
    series: dict[str, list[list[float]]] = defaultdict(list)
    for m in metric_rows:
        series[m["name"]].append([m["step"], m["value"]])
    unit = metric_rows[0]["unit"] if metric_rows else None
    return {
        "run_id": run_rows[0]["run_id"], "run_name": run_rows[0]["run_name"],
        "status": run_rows[-1]["status"],
        "attempts": [{k: (v.isoformat() if hasattr(v, "isoformat") else v) for k, v in r.items()
                      if k not in ("config", "summary")} for r in run_rows],
        "summary": json.loads(run_rows[-1]["summary"]) if run_rows[-1]["summary"] else None,
        "metrics": {"unit": unit, **series},
    }


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    config = load_config(args.config or DEFAULT_FILE, args.sets)
    spark = build_session("fedspark-runs", config.spark.conf, config.spark.delta_packages)
    if args.command == "list":
        rows = records.latest_rows(spark, config.lake.path).orderBy(F.desc("started_at")).collect()
        print("\n".join(list_lines([r.asDict() for r in rows])), flush=True)
    else:
        print_summary(show(*records.run_rows(spark, config.lake.path, args.run_id)))


if __name__ == "__main__":
    raise SystemExit(main_wrapper(main))
