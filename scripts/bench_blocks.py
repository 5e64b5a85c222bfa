"""Block building benchmark: the Fashion-MNIST table's training blocks and the federated clients'
blocks, each way in a fresh application (its own spark-submit, a cold JVM and Python workers, as
a run starts), after the table is pinned as a run pins it:

  * shuffle: the build through Spark (repartition on the shard's partition, sort within
    partitions, mapInArrow into the block writer): what every run paid before the block cache;
  * first: the build straight from the table's Parquet files into an empty block cache;
  * reuse: a later application taking the cached blocks.

The clients (`--clients-config`, default conf/fedavg_iid.yaml: 100 IID clients) are timed the same
three ways, with the test split's blocks the federated evaluation uses, as a run builds them. Each
way reports its seconds and its Spark stages (wall time and tasks, from the application's status
API), so the breakdown shows where the time goes. The floor: one Python process reading the
table's Parquet files into one float32 matrix and sorting it into block order (the least work a
build does on one core). Prints one JSON object and a markdown table; run through
scripts/bench_blocks.sh (it holds the benchmark lock).
"""
from __future__ import annotations

if __package__ in (None, ""):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import json
import sys
import tempfile
import time
import urllib.request
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from scripts.benchlib import BenchError, emit, log, machine, spark_submit, versions

WAYS = ("shuffle", "first", "reuse")
TABLE = "fashion_mnist"


def floor(lake_path: Path) -> float:
    """Seconds to read the table's features into one matrix and sort it into block order."""
    from udfs.data import direct

    files = sorted(str(p) for p in (lake_path / TABLE).glob("*.parquet"))
    started = time.perf_counter()
    parts, ids = [], []
    for batch in direct.read_columns(files, ("id", "features"), ("train", "test")):
        i = np.asarray(batch.column("id"))
        ids.append(i)
        parts.append(np.asarray(batch.column("features").values).reshape(len(i), -1))
    i = np.concatenate(ids)
    X = np.concatenate(parts)[np.lexsort((i, direct.shard_of(i)))]
    assert X.dtype == np.float32
    return time.perf_counter() - started


def stages(spark: Any) -> list[dict[str, Any]]:
    """The application's completed stages: name, wall seconds, tasks."""
    sc = spark.sparkContext
    url = f"{sc.uiWebUrl}/api/v1/applications/{sc.applicationId}/stages"
    with urllib.request.urlopen(url) as answer:
        found = json.load(answer)

    def at(text: str) -> float:
        return datetime.strptime(text.replace("GMT", "+0000"), "%Y-%m-%dT%H:%M:%S.%f%z").timestamp()

    return [{"stage": s["stageId"], "name": s["name"].split(" at ")[0][:40] + " at " +
             s["name"].rsplit("/", 1)[-1][:40], "seconds": round(at(s["completionTime"]) -
             at(s["submissionTime"]), 2), "tasks": s["numTasks"]}
            for s in sorted(found, key=lambda s: s["stageId"]) if s["status"] == "COMPLETE"]


def phase(args: argparse.Namespace) -> dict[str, Any]:
    """One way, in this (spark-submitted) application: pin the table, then time the blocks."""
    from pipelines.core.config import load_config
    from pipelines.core.session import build_session
    from pipelines.data import lake
    from pipelines.data.blocks import blocks_from_rows, load_blocks, read_rows
    from pipelines.data.direct import BlockCache
    from pipelines.federated.clients import clients_from_rows, prepare_clients

    sets = [f"lake.path={args.lake}", f"data.block_cache={args.cache}", "data.block_cache_gb=10"]
    config = load_config(args.clients_config if args.phase.startswith("clients") else None, sets)
    spark = build_session("bench-blocks", {"spark.master": "local[2]", "spark.ui.enabled": "true"})
    pinned = lake.pin(spark, config.lake.path, lake.TableRef(TABLE))
    config = config.with_version(pinned.version)
    ref = lake.TableRef(TABLE, pinned.version)
    before = len(stages(spark))
    started = time.perf_counter()
    way = args.phase.removeprefix("clients-")
    if args.phase.startswith("clients-"):
        if way == "shuffle":
            rows, version = read_rows(spark, config.lake.path, ref, ("train",))
            got = clients_from_rows(spark, config, rows, TABLE, version)
            test_rows, _ = read_rows(spark, config.lake.path, ref, ("test",))
            blocks_from_rows(spark, test_rows, TABLE, version, config.data.partitions, 0, 0.0,
                             ("test",))
        else:
            got, _ = prepare_clients(spark, config)
        count = got.count
    elif way == "shuffle":
        rows, version = read_rows(spark, config.lake.path, ref)
        count = blocks_from_rows(spark, rows, TABLE, version, args.partitions, 0, 0.2).partitions
    else:
        count = load_blocks(spark, config.lake.path, ref, args.partitions, 0, 0.2,
                            block_cache=BlockCache.of(config.data)).partitions
    seconds = time.perf_counter() - started
    return {"seconds": round(seconds, 2), "blocks": count, "stages": stages(spark)[before:]}


def run_all(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {"floor": {"seconds": round(floor(args.lake), 2)}}
    with tempfile.TemporaryDirectory(prefix="bench-block-cache-") as cache:
        for group in ("", "clients-"):
            for way in WAYS:
                name = f"{group}{way}"
                try:
                    results[name] = spark_submit(name, "scripts/bench_blocks.py", [
                        "--phase", name, "--lake", str(args.lake), "--cache", cache,
                        "--partitions", str(args.partitions),
                        "--clients-config", str(args.clients_config)])
                except BenchError as exc:
                    results[name] = {"error": str(exc)}
                log(f"{name}: {results[name].get('seconds')} s")
    return {"machine": machine(), "versions": versions(), "partitions": args.partitions,
            "clients_config": str(args.clients_config), "results": results}


def markdown(report: dict[str, Any]) -> str:
    r = report["results"]
    rows = ["| way | training blocks (s) | x floor | clients + test blocks (s) |",
            "|---|---|---|---|"]
    fl = r["floor"]["seconds"]
    for way in WAYS:
        a, b = r.get(way, {}), r.get(f"clients-{way}", {})
        ratio = f"{a['seconds'] / fl:.1f}x" if "seconds" in a and fl else "-"
        rows.append(f"| {way} | {a.get('seconds', '-')} | {ratio} | {b.get('seconds', '-')} |")
    rows.append(f"| floor (one process: read + sort) | {fl} | 1.0x | |")
    return "\n".join(rows)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lake", type=Path, default=Path("lake").resolve())
    p.add_argument("--partitions", type=int, default=2)
    p.add_argument("--clients-config", type=Path, default=Path("conf/fedavg_iid.yaml"))
    p.add_argument("--out", type=Path)
    p.add_argument("--phase", help=argparse.SUPPRESS)
    p.add_argument("--cache", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.lake = args.lake.resolve()
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.phase:
        print(json.dumps(phase(args)))
        return 0
    return emit(run_all(args), args.out, markdown)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
