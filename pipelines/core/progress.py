"""Progress of a long step (ingest, block build, an epoch or round) with an ETA, read from Spark's
status tracker by a background thread while the step's jobs run.

Spark's own console progress bar (`spark.ui.showConsoleProgress=true`) redraws one line on stderr;
while it is on, this reporter stays silent during the step and prints only its closing line, so the
two never interleave on a terminal.
"""
from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from pyspark import SparkContext

GROUP = "spark.jobGroup.id"


def task_counts(sc: SparkContext, group: str) -> tuple[int, int]:
    """(completed, total) tasks over the stages Spark has submitted for the group's jobs."""
    tracker = sc.statusTracker()
    done = total = 0
    for job_id in tracker.getJobIdsForGroup(group):
        job = tracker.getJobInfo(job_id)
        for stage_id in job.stageIds if job else ():
            stage = tracker.getStageInfo(stage_id)
            if stage is not None:
                done += stage.numCompletedTasks
                total += stage.numTasks
    return done, total


def clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 \
        else f"{seconds // 60}:{seconds % 60:02d}"


@contextmanager
def progress(sc: SparkContext, label: str, tag: str = "", every: float = 10.0,
             expected_tasks: int = 0, closing_line: bool = True) -> Iterator[None]:
    """Report `label: done/total tasks (pct)  eta m:ss` every `every` seconds while the block runs
    (only when something changed), then `label: done in s` unless the caller prints its own line.
    Ten seconds: often enough to show a step is alive, rare enough that a first run's console
    (ingest and block build, a minute each on 2 cores) stays short.
    `expected_tasks` is the step's total when it is known before its jobs are submitted (an epoch
    of many small jobs)."""
    group = f"fedspark-{uuid.uuid4().hex[:8]}"
    previous = sc.getLocalProperty(GROUP)
    sc.setLocalProperty(GROUP, group)
    quiet = sc.getConf().get("spark.ui.showConsoleProgress", "false").lower() == "true"
    suffix = f"  [{tag}]" if tag else ""
    started = time.perf_counter()
    stop = threading.Event()

    def report() -> None:
        last = None
        while not stop.wait(every):
            done, total = task_counts(sc, group)
            total = max(total, expected_tasks)
            if quiet or not total or (done, total) == last:
                continue
            last = (done, total)
            elapsed = time.perf_counter() - started
            eta = f"eta {clock(elapsed / done * (total - done))}" if done else "eta ?"
            print(f"{label}: {done}/{total} tasks ({100 * done // total}%)  {eta}{suffix}", flush=True)

    thread = threading.Thread(target=report, name=f"progress-{label}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        # None (no group before) unsets the property, as setLocalProperty documents; its
        # annotation says `value: str` all the same
        sc.setLocalProperty(GROUP, previous)  # type: ignore[arg-type]
        if closing_line:
            print(f"{label}: done in {time.perf_counter() - started:.1f}s{suffix}", flush=True)
