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

spark-defaults.conf (SPARK_CONF_DIR, else the conf/ directory of the installed Spark: scripts/setup.sh
writes one into the venv's pyspark, see pipelines/core/install.py) counts as "already given" for a
JVM that Python starts too, as it does under spark-submit: Spark reads it in both cases, and a
default of ours must not beat it only because Python started the JVM.

The console is quiet by default: the JVMs (driver and executors) read log4j2.properties beside this
module, which logs Spark at WARN, through `-Dlog4j2.configurationFile` in
spark.{driver,executor}.defaultJavaOptions (read at JVM start, so Spark's start-up INFO lines go
too; a user's own spark.*.extraJavaOptions still apply, after ours). FEDSPARK_LOG_LEVEL (any log4j
level; a job's --verbose sets INFO) brings Spark's logs back: the file reads it from the JVM's
environment, the session forwards it to executors, and under spark-submit, whose JVM started
before the job parsed --verbose, it is applied to the running JVM before the SparkContext starts.
"""
from __future__ import annotations

import importlib.metadata
import os
import re
import sys
from pathlib import Path
from typing import Any

from pyspark import SparkConf, SparkContext
from pyspark.sql import SparkSession

from pipelines.core.errors import UserError

DELTA_EXTENSION = "io.delta.sql.DeltaSparkSessionExtension"
DELTA_CATALOG = "org.apache.spark.sql.delta.catalog.DeltaCatalog"

LOG4J2_FILE = Path(__file__).resolve().with_name("log4j2.properties")
QUIET_JAVA_OPTIONS = f"-Dlog4j2.configurationFile={LOG4J2_FILE.as_uri()}"
LOG_LEVEL_VARIABLE = "FEDSPARK_LOG_LEVEL"
LOG_LEVELS = ("ALL", "TRACE", "DEBUG", "INFO", "WARN", "ERROR", "FATAL", "OFF")

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
    # the quiet console (log4j2.properties): "default" options, so a user's extraJavaOptions add to
    # them instead of replacing them
    "spark.driver.defaultJavaOptions": QUIET_JAVA_OPTIONS,
    "spark.executor.defaultJavaOptions": QUIET_JAVA_OPTIONS,
}
# what must be in place before spark-submit starts the JVM (the rest of DEFAULTS can wait for the
# session builder)
SUBMIT_KEYS = ("spark.sql.extensions", "spark.sql.catalog.spark_catalog",
               "spark.driver.defaultJavaOptions", "spark.executor.defaultJavaOptions")
SUBMIT_FLAGS = {"spark.jars": "--jars", "spark.jars.packages": "--packages"}


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


def submit_conf(setting: str = "auto") -> dict[str, str]:
    """The Spark properties a job needs before its JVM starts: Delta's jars (or its package) on the
    driver and executors, Delta's extensions, the quiet log configuration. One source for the
    `fedspark` command (submit_args) and the venv's spark-defaults.conf (pipelines/core/install.py)."""
    packages = packages_setting(setting)
    jars = delta_jars(packages)
    conf = {"spark.jars": ",".join(jars)} if jars else {} if packages is None else \
        {"spark.jars.packages": packages}
    return {**conf, **{key: DEFAULTS[key] for key in SUBMIT_KEYS}}


def submit_args(setting: str = "auto") -> list[str]:
    """submit_conf as spark-submit arguments: Delta's jars and package as --jars and --packages
    (the flags a user adds to; see pipelines/core/launcher.py), the rest as --conf."""
    args: list[str] = []
    for key, value in submit_conf(setting).items():
        args += [SUBMIT_FLAGS[key], value] if key in SUBMIT_FLAGS else ["--conf", f"{key}={value}"]
    return args


def requested_log_level() -> str | None:
    """The log4j level FEDSPARK_LOG_LEVEL asks for (upper case), None when it is unset or empty."""
    value = os.environ.get(LOG_LEVEL_VARIABLE, "").strip()
    if not value:
        return None
    if value.upper() not in LOG_LEVELS:
        raise UserError(f"{LOG_LEVEL_VARIABLE}={value!r} is not a log4j level; use one of "
                        f"{', '.join(LOG_LEVELS)}")
    return value.upper()


def spark_conf_dir() -> Path:
    """Where Spark looks for spark-defaults.conf: SPARK_CONF_DIR, else <SPARK_HOME>/conf, and
    SPARK_HOME is the installed pyspark package unless set (as pip's pyspark scripts resolve it)."""
    import pyspark

    if os.environ.get("SPARK_CONF_DIR"):
        return Path(os.environ["SPARK_CONF_DIR"])
    return Path(os.environ.get("SPARK_HOME") or Path(pyspark.__file__).parent) / "conf"


def read_properties(path: Path) -> dict[str, str]:
    """The `key value` / `key=value` lines of a spark-defaults.conf (`#` and `!` start comments; no
    line continuations or escapes, which Spark's own files do not use); {} when there is none."""
    if not path.is_file():
        return {}
    found = {}
    for line in path.read_text().splitlines():
        match = re.match(r"([^\s=:]+)(?:\s*[=:]\s*|\s+|$)(.*)", line.strip())
        if match and not match.group(1).startswith(("#", "!")):
            found[match.group(1)] = match.group(2).strip()
    return found


def _jvm_running() -> bool:
    """True under spark-submit (or an existing SparkContext): the JVM's classpath is fixed."""
    return "PYSPARK_GATEWAY_PORT" in os.environ or SparkSession.getActiveSession() is not None


def _given_conf() -> SparkConf:
    """What spark-submit and spark-defaults.conf set. Under spark-submit the JVM's SparkConf holds
    both; a JVM that Python is about to start will read spark-defaults.conf, so its entries count
    as given too."""
    given = SparkConf()
    if not _jvm_running():
        for key, value in read_properties(spark_conf_dir() / "spark-defaults.conf").items():
            given.setIfMissing(key, value)
    return given


def _set_root_log_level(level: str) -> None:
    """Set the running JVM's root logger (spark-submit started it before the job read --verbose)."""
    jvm = SparkContext._jvm
    assert jvm is not None  # SparkContext._ensure_initialized() connected to it
    log4j = jvm.org.apache.logging.log4j
    log4j.core.config.Configurator.setRootLevel(log4j.Level.toLevel(level))


def build_session(app_name: str, extra: dict[str, Any] | None = None,
                  delta_packages: str = "auto") -> SparkSession:
    """Get or create the job's SparkSession with Delta enabled (`delta_packages`: the
    spark.delta_packages setting, see packages_setting)."""
    level = requested_log_level()
    if _jvm_running():
        # connect to spark-submit's JVM first: only then does SparkConf() read what spark-submit
        # set (--master, --conf); before that it is an empty Python-side conf, and our local[*]
        # default would beat `spark-submit --master`
        SparkContext._ensure_initialized()
        if level:
            _set_root_log_level(level)
    given = _given_conf()
    conf: dict[str, str] = {**DEFAULTS, "spark.master": "local[*]"}
    if level:  # executors read log4j2.properties' level from their environment
        conf[f"spark.executorEnv.{LOG_LEVEL_VARIABLE}"] = level
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
