"""Once per Python worker process: settings every task of ours wants, made on its first task.

* One BLAS thread: the Spark task is the unit of parallelism.
* Spark's own archives stop being re-read on every task. PySpark's worker calls
  importlib.invalidate_caches() before each task, and on Python 3.11 every zipimporter then re-reads
  its archive's whole directory. The workers' PYTHONPATH holds pyspark.zip (1,220 entries) and the
  spark-core jar (5,264 entries, no Python in it), and each package imported from pyspark.zip has an
  importer of its own: measured here, that was 50-150 ms of every task, most of a round's overhead
  (docs/BENCHMARKS.md). The archives do not change while the application runs, so the importers
  that exist after the first task keep the directories they read; archives added later
  (SparkContext.addPyFile) are untouched and behave as before.
"""
from __future__ import annotations

import sys
import zipimport
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pyarrow as pa

if TYPE_CHECKING:
    from pyspark import Broadcast

_PREPARED = False


class _StaticZipImporter(zipimport.zipimporter):
    """A zipimporter for an archive that never changes while the worker lives."""

    def invalidate_caches(self) -> None:
        pass


def _freeze_zip_importers() -> None:
    for key, finder in list(sys.path_importer_cache.items()):
        if type(finder) is zipimport.zipimporter:
            sys.path_importer_cache[key] = _StaticZipImporter(key)


def prepare() -> None:
    global _PREPARED
    if _PREPARED:
        return
    from threadpoolctl import threadpool_limits

    threadpool_limits(1)
    _freeze_zip_importers()
    _PREPARED = True


def origin(_: object = None) -> dict[str, str]:
    """Where this Python worker runs from: its interpreter and the files `udfs` and numpy were
    imported from (map it over a few rows to see what an executor actually uses)."""
    import numpy

    import udfs

    return {"python": sys.executable, "udfs": udfs.__file__, "numpy": numpy.__file__}


def arrow_chunks(batches: Iterator[pa.RecordBatch], chunks: list[Broadcast[bytes]]) -> Iterator[pa.RecordBatch]:
    """mapInArrow over `spark.range(len(chunks))`: the record batches of the broadcast Arrow IPC
    streams whose index arrives in `id` (pipelines.lake.arrow_frame)."""
    for batch in batches:
        for i in batch.column("id").to_pylist():
            yield from pa.ipc.open_stream(chunks[i].value).read_all().to_batches()
