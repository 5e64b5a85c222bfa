"""Per-step all-reduce latency for `sync`'s barrier stages: a 101,770-float vector (the MLP
784-128-10's parameters) summed over 2 tasks, by each way a barrier task could exchange it.

Ways (each in the same run, one after another):
  * spark_allgather: BarrierTaskContext.allGather of the vector's bytes (base64), then the sum;
  * spark_barrier: BarrierTaskContext.barrier() alone (no data: the floor of any driver round trip);
  * ring: udfs/training/collective.py's TCP ring, as `sync` runs it (float32 and float64);
  * gloo: torch.distributed's all_reduce over gloo in 2 processes (as TorchDistributor's DDP runs
    it), when --torch-python names a Python with torch (a venv of its own: torch is not ours);
  * numpy_add: adding two such vectors in one process, the floor of any reduction.
Prints one JSON object on stdout (medians in milliseconds per call); progress on stderr. Run through
scripts/bench_allreduce.sh.
"""
from __future__ import annotations

if __package__ in (None, ""):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import base64
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from functools import partial
from pathlib import Path

import numpy as np

from pipelines.core.session import build_session
from pipelines.training import rendezvous
from scripts.benchlib import log, machine, versions
from udfs.training import collective

LENGTH = 101_770
SECRET = b"bench-allreduce-not-a-secret-000"

GLOO = r'''
import os, sys, time, json, statistics
import torch, torch.distributed as dist
rank, calls, length, port = (int(a) for a in sys.argv[1:5])
torch.set_num_threads(1)
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
x = torch.ones(length, dtype=torch.float32)
for _ in range(10):
    dist.all_reduce(x)
seconds = []
for _ in range(calls):
    t = time.perf_counter(); dist.all_reduce(x); seconds.append(time.perf_counter() - t)
    x *= 0.5
if rank == 0:
    print(json.dumps({"ms": 1000 * statistics.median(seconds), "torch": torch.__version__}))
dist.destroy_process_group()
'''


def _stage(_: Iterable[int], way: str, calls: int, dtype: str,
           meet: tuple[str, int]) -> Iterator[float]:
    from pyspark import BarrierTaskContext

    context = BarrierTaskContext.get()
    vec = np.random.default_rng(context.partitionId()).normal(size=LENGTH).astype(dtype)
    ring = collective.join(context, SECRET, collective.PortRange(), meet) if way == "ring" else None
    seconds = []
    for i in range(calls + 2):   # two warm-up calls
        started = time.perf_counter()
        if way == "spark_allgather":
            parts = context.allGather(base64.b64encode(vec.tobytes()).decode())
            np.sum([np.frombuffer(base64.b64decode(p), dtype=dtype) for p in parts], axis=0)
        elif way == "spark_barrier":
            context.barrier()
        else:
            assert ring is not None
            ring.allreduce(vec)
            vec *= 0.5   # the sum of 2 tasks: keep the values finite over many calls
        if i >= 2:
            seconds.append(time.perf_counter() - started)
    if ring is not None:
        ring.close()
    yield 1000 * statistics.median(seconds)


def spark_ways(calls_spark: int, calls_ring: int) -> dict[str, float]:
    spark = build_session("bench-allreduce", {"spark.master": "local[2]"})
    sc = spark.sparkContext
    meet = rendezvous.for_driver(sc, collective.PortRange())
    out = {}
    for way, calls, dtype in (("spark_barrier", calls_spark, "float32"),
                              ("spark_allgather", calls_spark, "float32"),
                              ("ring", calls_ring, "float32"), ("ring", calls_ring, "float64")):
        name = f"{way}_{dtype}" if way == "ring" else way
        log(f"{name}: {calls} calls on 2 barrier tasks")
        with meet.meeting(SECRET):
            got: list[float] = (sc.parallelize(range(2), 2).barrier().mapPartitions(
                partial(_stage, way=way, calls=calls, dtype=dtype, meet=meet.address)).collect())
        out[name] = round(max(got), 3)
    spark.stop()
    return out


def gloo(python: str, calls: int) -> dict[str, object]:
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as fh:
        fh.write(GLOO)
    port = str(29_500 + os.getpid() % 1000)
    procs = [subprocess.Popen([python, fh.name, str(rank), str(calls), str(LENGTH), port],
                              stdout=subprocess.PIPE, text=True) for rank in (0, 1)]
    outs = [p.communicate()[0] for p in procs]
    os.unlink(fh.name)
    if any(p.returncode for p in procs):
        raise RuntimeError(f"gloo processes failed: {[p.returncode for p in procs]}")
    got = json.loads(outs[0])
    return {"gloo_float32": round(got["ms"], 3), "torch": got["torch"]}


def numpy_add(calls: int) -> float:
    a, b = (np.random.default_rng(i).normal(size=LENGTH).astype(np.float32) for i in range(2))
    seconds = []
    for _ in range(calls):
        started = time.perf_counter()
        a += b
        seconds.append(time.perf_counter() - started)
    return round(1000 * statistics.median(seconds), 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls-spark", type=int, default=5)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--torch-python", help="a Python with torch, for the gloo way")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    result: dict[str, object] = {"date": time.strftime("%Y-%m-%d"), "machine": machine(),
                                 "versions": versions(), "floats": LENGTH, "tasks": 2,
                                 "ms_per_call": {"numpy_add": numpy_add(args.calls)}}
    ms = result["ms_per_call"]
    assert isinstance(ms, dict)
    ms.update(spark_ways(args.calls_spark, args.calls))
    if args.torch_python:
        got = gloo(args.torch_python, args.calls)
        result["torch"] = got.pop("torch")
        ms.update(got)
    text = json.dumps(result, indent=1)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
