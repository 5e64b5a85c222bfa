"""What the set-up (scripts/setup.sh) does to the venv's Spark, so that plain
`spark-submit pipelines/<job>.py` works inside the venv, and quietly:

* Delta's jars are fetched from Maven Central once, into Ivy's cache, with Ivy's resolution report
  kept in a log file that only a failure shows (Ivy prints it itself, not through log4j, so the
  quiet log configuration cannot hide it); later starts name the cached jars (session.delta_jars).
* a spark-defaults.conf in the conf/ directory of the venv's pyspark (where pip's spark-submit
  looks when neither SPARK_CONF_DIR nor SPARK_HOME is set) holds session.submit_conf: Delta's jars
  or package, its extensions, the quiet log configuration.

Every JVM the venv starts reads that file: spark-submit's, the ones a Python session starts
(session.py counts its entries as given, as spark-submit does), and the standalone cluster's
applications (scripts/cluster.sh). A spark-defaults.conf that fedspark did not write is left alone.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from pipelines.core.session import IVY_JARS, delta_jars, delta_package, packages_setting, submit_conf

MARKER = "# written by fedspark (python -m pipelines.core.install, run by scripts/setup.sh)"


class DeltaFetchError(RuntimeError):
    """Ivy could not fetch Delta's jars (no network, no Maven Central): a failure, exit 1."""


def spark_submit() -> str:
    """The spark-submit beside this Python (the venv's, from pip's pyspark), else the PATH's."""
    beside = Path(sys.executable).with_name("spark-submit")
    found = str(beside) if beside.is_file() else shutil.which("spark-submit")
    if found is None:
        raise DeltaFetchError(f"no spark-submit beside {sys.executable} or on the PATH: install pyspark")
    return found


def submit_environment() -> dict[str, str]:
    """The environment spark-submit runs in: driver and workers on this Python (the venv's, as
    scripts/setup.sh exports) unless set. pip's spark-submit also finds Spark's home with that
    Python, so a fedspark started outside the activated venv still finds pyspark."""
    env = dict(os.environ)
    for variable in ("PYSPARK_PYTHON", "PYSPARK_DRIVER_PYTHON"):
        env.setdefault(variable, sys.executable)
    return env


def fetch_delta_jars(setting: str = "auto") -> bool:
    """When `setting` (spark.delta_packages) asks for the pinned Delta and Ivy's cache lacks its
    jars: let spark-submit's own Ivy fetch them (so they land where Spark looks, with Spark's
    exclusions), running an empty Python file. True when it fetched."""
    packages = packages_setting(setting)
    if packages != delta_package() or delta_jars(packages):
        return False
    print(f"[fedspark] fetching {packages} from Maven Central into {IVY_JARS} (once)",
          file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(prefix="fedspark-ivy-") as tmp:
        empty, log = Path(tmp, "nothing.py"), Path(tmp, "ivy.log")
        empty.write_text("")
        with log.open("w") as out:
            done = subprocess.run([spark_submit(), "--packages", packages, str(empty)],
                                  stdout=out, stderr=subprocess.STDOUT, env=submit_environment())
        if done.returncode or not delta_jars(packages):
            tail = "\n".join(log.read_text().splitlines()[-20:])
            raise DeltaFetchError(f"fetching {packages} failed (spark-submit exit {done.returncode}); "
                                  f"the end of Ivy's report:\n{tail}")
    return True


def venv_spark_defaults() -> Path:
    """The spark-defaults.conf pip's spark-submit reads by default: <pyspark package>/conf/."""
    import pyspark

    return Path(pyspark.__file__).parent / "conf" / "spark-defaults.conf"


def spark_defaults_text() -> str:
    return MARKER + "\n" + "".join(f"{key} {value}\n" for key, value in submit_conf().items())


def write_spark_defaults(path: Path) -> bool:
    """Write spark_defaults_text to `path` when it says something else (atomically: a JVM starting
    meanwhile reads the old file or the new one). True when written; a file without our marker
    line is someone's own and stays as it is (a line on stderr says so)."""
    text = spark_defaults_text()
    current = path.read_text() if path.is_file() else None
    if current == text:
        return False
    if current is not None and not current.startswith(MARKER):
        print(f"[fedspark] {path} was not written by fedspark; left as it is (plain spark-submit "
              "there needs Delta's --packages and extensions, see the README)", file=sys.stderr)
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    partial.write_text(text)
    partial.replace(path)
    return True


def main() -> int:
    """`python -m pipelines.core.install`: fetch Delta's jars if needed, then write the venv's
    spark-defaults.conf. Quiet unless it does something; exit 1 when the fetch fails."""
    try:
        fetch_delta_jars()
    except DeltaFetchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    path = venv_spark_defaults()
    if write_spark_defaults(path):
        print(f"[fedspark] wrote {path} (Delta's jars and extensions, the quiet log configuration) "
              "for plain spark-submit", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
