"""The one SparkSession builder: Delta on, defaults only where nothing else set a value.

Precedence, lowest first: our defaults < the job config's `spark.conf` < whatever spark-submit
(`--master`, `--conf`, spark-defaults.conf) already put in the SparkConf. A hard-coded `.master()`
would silently beat `spark-submit --master`, so the master is `local[*]` only when nobody set one.

Delta's JVM side: when Python starts the JVM itself (pytest, `python pipelines/train.py`), the Delta
artifact is requested through `spark.jars.packages` and cached by Ivy. Under spark-submit the JVM is
already running, so the jar must come from `--packages` (scripts/train.sh passes it; see
`submit_args`), or already be on the cluster: the setting `spark.delta_packages: none` (or the
environment variable FEDSPARK_DELTA_PACKAGES=none, which wins) skips Maven.

Once Ivy has resolved the pinned Delta version, `auto` names its two jars in Ivy's cache
(delta-spark and delta-storage, what Delta's JVM side runs on) instead of the Maven coordinate:
`--packages` would resolve again on every start and ship all 33 transitive jars (86 MB: Hadoop,
Parquet, Unity Catalog clients Spark does not need for Delta tables on a file system) to every
executor, twice for a Python application (spark-submit also puts them on the Python path).
"""
from __future__ import annotations

import importlib.metadata
import os
import sys
from pathlib import Path
from typing import Any

from pyspark import SparkConf, SparkContext
from pyspark.sql import SparkSession

from pipelines.core.errors import UserError

DELTA_EXTENSION = "io.delta.sql.DeltaSparkSessionExtension"
DELTA_CATALOG = "org.apache.spark.sql.delta.catalog.DeltaCatalog"

DEFAULTS: dict[str, str] = {
    "spark.sql.extensions": DELTA_EXTENSION,
    "spark.sql.catalog.spark_catalog": DELTA_CATALOG,
    # one BLAS thread per task: the task is the unit of parallelism
    "spark.executorEnv.OMP_NUM_THREADS": "1",
    "spark.executorEnv.OPENBLAS_NUM_THREADS": "1",
    "spark.executorEnv.MKL_NUM_THREADS": "1",
    "spark.ui.showConsoleProgress": "false",
    # small tables: Delta's default 50 partitions for log replay cost seconds on 2 cores
    "spark.databricks.delta.snapshotPartitions": "2",
    "spark.sql.shuffle.partitions": "8",
    # blocks live on the executor that built them; wait for it rather than run elsewhere
    "spark.locality.wait": "30s",
    "spark.sql.execution.arrow.pyspark.enabled": "true",
}


def delta_package() -> str:
    """The Maven coordinate of Delta's JVM side that pairs with the installed pip packages."""
    import pyspark

    spark_minor = ".".join(pyspark.__version__.split(".")[:2])
    delta_version = importlib.metadata.version("delta-spark")
    return f"io.delta:delta-spark_{spark_minor}_2.13:{delta_version}"


# where Spark's Ivy puts resolved jars (spark.jars.ivy's default in Spark 4)
IVY_JARS = Path.home() / ".ivy2.5.2" / "jars"


def delta_jars(packages: str | None) -> list[str] | None:
    """For `packages` (packages_setting's answer) naming the pinned Delta version: its delta-spark
    and delta-storage jars in Ivy's cache; None for other packages or until Ivy has resolved them."""
    if packages != delta_package():
        return None
    group, artifact, version = packages.split(":")
    jars = [IVY_JARS / f"{group}_{artifact}-{version}.jar", IVY_JARS / f"{group}_delta-storage-{version}.jar"]
    return [str(j) for j in jars] if all(j.is_file() for j in jars) else None


def packages_setting(setting: str = "auto") -> str | None:
    """The Delta package to ask Maven for, from the `spark.delta_packages` setting (auto: the one
    that pairs with the pip packages; none: skip, the cluster ships Delta) and the environment
    variable FEDSPARK_DELTA_PACKAGES, which wins; None when nothing should be fetched."""
    value = os.environ.get("FEDSPARK_DELTA_PACKAGES", setting)
    if value == "none":
        return None
    return delta_package() if value == "auto" else value


def submit_args(setting: str = "auto") -> list[str]:
    """Arguments scripts/train.sh gives spark-submit so the Delta jar is on the driver and executors."""
    packages = packages_setting(setting)
    jars = delta_jars(packages)
    args = [] if packages is None else ["--jars", ",".join(jars)] if jars else ["--packages", packages]
    for key in ("spark.sql.extensions", "spark.sql.catalog.spark_catalog"):
        args += ["--conf", f"{key}={DEFAULTS[key]}"]
    return args


def _jvm_running() -> bool:
    """True under spark-submit (or an existing SparkContext): the JVM's classpath is fixed."""
    return "PYSPARK_GATEWAY_PORT" in os.environ or SparkSession.getActiveSession() is not None


def build_session(app_name: str, extra: dict[str, Any] | None = None,
                  delta_packages: str = "auto") -> SparkSession:
    """Get or create the job's SparkSession with Delta enabled (`delta_packages`: the
    spark.delta_packages setting, see packages_setting)."""
    if _jvm_running():
        # connect to spark-submit's JVM first: only then does SparkConf() read what spark-submit
        # set (--master, --conf); before that it is an empty Python-side conf, and our local[*]
        # default would beat `spark-submit --master`
        SparkContext._ensure_initialized()
    given = SparkConf()  # holds what spark-submit and spark-defaults.conf set
    conf: dict[str, str] = {**DEFAULTS, "spark.master": "local[*]"}
    conf.update({k: str(v) for k, v in (extra or {}).items()})
    if not _jvm_running() and not given.contains("spark.jars.packages"):
        packages = packages_setting(delta_packages)
        jars = delta_jars(packages)
        if jars:
            conf["spark.jars"] = ",".join([*jars, conf["spark.jars"]] if "spark.jars" in conf else jars)
        elif packages is not None:
            conf["spark.jars.packages"] = packages
    builder = SparkSession.builder.appName(app_name)
    for key, value in conf.items():
        if not given.contains(key):
            builder = builder.config(key, value)
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("WARN")
    _check_delta(spark)
    return spark


def _check_delta(spark: SparkSession) -> None:
    jvm = spark.sparkContext._jvm
    if jvm is None:
        raise RuntimeError("the SparkContext has no JVM gateway (it was stopped); cannot check for "
                           "Delta Lake")
    try:
        jvm.java.lang.Class.forName(DELTA_CATALOG, True,
                                    jvm.java.lang.Thread.currentThread().getContextClassLoader())
    except Exception as exc:  # py4j wraps ClassNotFoundException
        raise UserError(
            "Delta Lake's JVM classes are not on Spark's classpath. Run through scripts/train.sh, or "
            f"pass `--packages {delta_package()}` to spark-submit (or ship the jar with --jars on "
            "clusters without Maven access).") from exc
