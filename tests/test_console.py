"""The quiet console (Spark at WARN through the shipped log4j2.properties, --verbose and
FEDSPARK_LOG_LEVEL to bring its logs back) and the `fedspark` command that runs any job through
spark-submit with Delta set up. The jobs run for real, through spark-submit in a subprocess."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.core import install, launcher
from pipelines.core.errors import UserError
from pipelines.core.session import LOG4J2_FILE, read_properties, requested_log_level, submit_args, submit_conf

ROOT = Path(__file__).resolve().parents[1]
SPARK_LOG_LINE = re.compile(r"^\d\d/\d\d/\d\d \d\d:\d\d:\d\d (INFO|DEBUG|TRACE) ")


def fedspark(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`fedspark ARGS` from this checkout (its code first on the path, for the driver and the
    workers alike), FEDSPARK_LOG_LEVEL unset unless `env` sets it."""
    base = {k: v for k, v in os.environ.items() if k != "FEDSPARK_LOG_LEVEL"}
    return subprocess.run([sys.executable, "-m", "pipelines.core.launcher", *args], cwd=ROOT,
                          env={**base, "PYTHONPATH": str(ROOT), **(env or {})}, capture_output=True,
                          text=True)


def test_a_job_logs_no_spark_info_lines_and_its_error_reaches_the_console(tmp_path):
    """A job that starts Spark and then stops with a clear error (no run records in an empty
    lake). spark-submit hands the Python job's stderr on as its stdout: the console is both."""
    done = fedspark("--master", "local[1]", "runs", "list", "--set", f"lake.path={tmp_path}")
    console = (done.stdout + done.stderr).splitlines()
    assert done.returncode == 2, console[-30:]
    assert any(line.startswith("error: no run records yet") for line in console)
    assert not [line for line in console if SPARK_LOG_LINE.match(line)]
    assert "Using Spark's default log4j profile" not in console   # ours was read instead


def test_verbose_asks_for_spark_logs_at_info(monkeypatch):
    from pipelines import evaluate

    monkeypatch.setenv("FEDSPARK_LOG_LEVEL", "")   # unset for the job; restored afterwards
    evaluate.parse_args(["--model", "runs/r", "--verbose"])
    assert requested_log_level() == "INFO"
    monkeypatch.setenv("FEDSPARK_LOG_LEVEL", "debug")
    evaluate.parse_args(["--model", "runs/r", "--verbose"])   # a level named explicitly stays
    assert requested_log_level() == "DEBUG"


def test_a_requested_level_reaches_a_running_jvm(spark, monkeypatch):
    """Under spark-submit the JVM starts before the job reads --verbose: the session applies the
    level to it before the SparkContext logs anything, and to executors through their environment."""
    from pipelines.core.session import build_session

    root = spark.sparkContext._jvm.org.apache.logging.log4j.LogManager.getRootLogger()
    before = str(root.getLevel())
    monkeypatch.setenv("FEDSPARK_LOG_LEVEL", "INFO")
    try:
        assert build_session("fedspark-tests") is spark
        assert str(root.getLevel()) == "INFO"
    finally:
        monkeypatch.setenv("FEDSPARK_LOG_LEVEL", before)
        build_session("fedspark-tests")
    assert str(root.getLevel()) == before


def test_the_session_jvm_reads_the_shipped_log_configuration(spark):
    """A JVM that Python starts (this suite's) gets the same configuration as spark-submit's."""
    jvm = spark.sparkContext._jvm
    assert jvm.java.lang.System.getProperty("log4j2.configurationFile") == LOG4J2_FILE.as_uri()
    root = jvm.org.apache.logging.log4j.LogManager.getRootLogger()
    assert str(root.getLevel()) == (requested_log_level() or "WARN")


def test_a_log_level_log4j_does_not_know_is_named(monkeypatch):
    monkeypatch.setenv("FEDSPARK_LOG_LEVEL", "loud")
    with pytest.raises(UserError, match="FEDSPARK_LOG_LEVEL='loud'.*INFO"):
        requested_log_level()
    monkeypatch.setenv("FEDSPARK_LOG_LEVEL", "info")
    assert requested_log_level() == "INFO"


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_jobs_are_the_files_with_main_and_a_main_guard(tmp_path):
    _write(tmp_path / "job.py", "def main(argv):\n    pass\n\n\nif __name__ == '__main__':\n    main([])\n")
    _write(tmp_path / "library.py", "def main(argv):\n    pass\n")
    _write(tmp_path / "script.py", "if __name__ == '__main__':\n    print('hi')\n")
    _write(tmp_path / "__init__.py", "")
    assert launcher.find_jobs(tmp_path) == {"job": tmp_path / "job.py"}
    found = launcher.find_jobs()
    assert {"train", "ingest", "evaluate", "score", "runs", "generate"} <= set(found)
    assert "estimators" not in found   # a re-export, not a job


def test_options_before_the_job_are_spark_submits_and_the_rest_the_jobs():
    jobs = launcher.find_jobs()
    got = launcher.split(["--master", "spark://h:7077", "--name", "train", "--verbose",
                          "--conf=spark.a=b", "train", "--config", "X", "--verbose"], jobs)
    assert got.options == (("--master", "spark://h:7077"), ("--name", "train"), ("--verbose", None),
                           ("--conf", "spark.a=b"))
    assert (got.job, got.job_args) == ("train", ("--config", "X", "--verbose"))
    with pytest.raises(UserError, match="unknown job 'trian'.*train"):
        launcher.split(["--master", "local[2]", "trian"], jobs)


def test_the_command_runs_the_job_by_path_with_delta_and_the_users_options_last():
    jobs = launcher.find_jobs()
    ours = submit_args()
    flag = next(f for f in ours if f in ("--jars", "--packages"))   # Delta's, cached or from Maven
    invocation = launcher.split(["--master", "local[1]", flag, "extra", "--conf", "spark.x=1",
                                 "evaluate", "--model", "runs/r"], jobs)
    cmd = launcher.command(invocation, jobs)
    assert Path(cmd[0]).name == "spark-submit"
    assert cmd[-3:] == [str(ROOT / "pipelines" / "evaluate.py"), "--model", "runs/r"]
    options = cmd[1:-3]
    assert options.count(flag) == 1   # spark-submit keeps only the last one: the user's adds to Delta's
    assert options[options.index(flag) + 1] == f"{ours[ours.index(flag) + 1]},extra"
    assert options[-4:] == ["--master", "local[1]", "--conf", "spark.x=1"]   # after ours: theirs win
    assert f"spark.driver.defaultJavaOptions=-Dlog4j2.configurationFile={LOG4J2_FILE.as_uri()}" in options


def test_help_lists_the_jobs(capsys):
    assert launcher.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(f"\n  {job} " in out for job in launcher.find_jobs())
    assert launcher.main([]) == 2   # no job: the usage, on stderr


def test_fedspark_is_the_projects_console_script():
    """(tomllib is Python 3.11's; the project runs on 3.10 too: the section is read as text.)"""
    section = (ROOT / "pyproject.toml").read_text().split("[project.scripts]\n", 1)[1].split("\n[", 1)[0]
    assert re.search(r'^fedspark = "pipelines\.core\.launcher:main"$', section, re.M)


def test_spark_defaults_hold_what_spark_submit_needs_and_a_foreign_file_stays(tmp_path):
    path = tmp_path / "conf" / "spark-defaults.conf"
    assert install.write_spark_defaults(path)
    assert read_properties(path) == submit_conf()
    assert not install.write_spark_defaults(path)   # unchanged: not rewritten
    _write(path, "spark.master spark://theirs:7077\n")
    assert not install.write_spark_defaults(path)
    assert path.read_text() == "spark.master spark://theirs:7077\n"


def test_spark_defaults_lines_are_read_as_spark_reads_them(tmp_path):
    path = _write(tmp_path / "spark-defaults.conf",
                  "# a comment\n\nspark.master   local[3]\nspark.a=b c\nspark.d : e\n! another\nspark.empty\n")
    assert read_properties(path) == {"spark.master": "local[3]", "spark.a": "b c", "spark.d": "e",
                                     "spark.empty": ""}
    assert read_properties(tmp_path / "missing.conf") == {}
