"""The `fedspark` command: run any job, pipelines/<job>.py, through spark-submit with Delta's jars
and extensions and the quiet log configuration (session.submit_args), as scripts/train.sh does.

    fedspark [spark-submit options] JOB [job arguments]

As with spark-submit itself, what comes before the job is spark-submit's (--master, --conf,
--driver-memory, --py-files, --archives, --verbose, ...) and passes through unchanged, after
fedspark's own settings so that a user's --conf wins; --jars and --packages add to Delta's instead
of replacing them (spark-submit keeps only the last of each). Everything after the job's name is
the job's.

The jobs are found, not listed: every pipelines/*.py with a top-level `main()` and an
`if __name__ == "__main__":` guard, read from the file's syntax tree. The dispatcher never imports
an entry point (no library module does); spark-submit runs it by path.
"""
from __future__ import annotations

import argparse
import ast
import os
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

from pipelines.core.errors import EXIT_FAILURE, EXIT_USER_ERROR, UserError
from pipelines.core.install import DeltaFetchError, fetch_delta_jars, spark_submit, submit_environment
from pipelines.core.session import LOG_LEVEL_VARIABLE, SUBMIT_FLAGS, requested_log_level, submit_args

PIPELINES = Path(__file__).resolve().parents[1]
# spark-submit's options that take no value (SparkSubmitOptionParser's switches); every other
# option takes one, as `--opt VALUE` or `--opt=VALUE`
SWITCHES = frozenset({"--help", "-h", "--verbose", "-v", "--version", "--supervise", "--usage-error"})
HELP = frozenset({"--help", "-h"})


def is_job(path: Path) -> bool:
    """A file spark-submit can run as a job: a top-level `def main` and a `__main__` guard (what
    tests/test_layout.py requires of pipelines/*.py; pipelines/estimators.py has neither)."""
    body = ast.parse(path.read_text(), str(path)).body
    return any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in body) and \
        any(isinstance(n, ast.If) and "__main__" in ast.unparse(n.test) for n in body)


def find_jobs(directory: Path = PIPELINES) -> dict[str, Path]:
    """The jobs in `directory`, by name (the file's stem), in name order."""
    return {p.stem: p for p in sorted(directory.glob("*.py")) if p.name != "__init__.py" and is_job(p)}


def synopsis(name: str, path: Path) -> str:
    """A job's arguments for --help, from its docstring's usage paragraph (`spark-submit
    pipelines/<job>.py ARGS`, the convention every job's docstring follows), on one line."""
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    usage_line = " ".join(doc.split("\n\n")[0].split())
    return usage_line.removeprefix(f"spark-submit pipelines/{name}.py").strip()


@dataclass(frozen=True)
class Invocation:
    """A command line taken apart: spark-submit's options as (option, value or None) pairs, the
    job (None when no job was named) and the job's arguments."""

    options: tuple[tuple[str, str | None], ...]
    job: str | None
    job_args: tuple[str, ...]


def split(argv: list[str], jobs: dict[str, Path]) -> Invocation:
    """Read spark-submit's options up to the first word that is not an option or an option's
    value: the job, which must be one of `jobs`."""
    options: list[tuple[str, str | None]] = []
    i = 0
    while i < len(argv) and argv[i].startswith("-"):
        flag, eq, value = argv[i].partition("=")
        if eq or flag in SWITCHES:
            options.append((flag, value if eq else None))
            i += 1
        elif i + 1 < len(argv):
            options.append((flag, argv[i + 1]))
            i += 2
        else:
            raise UserError(f"spark-submit option {flag} needs a value")
    if i == len(argv):
        return Invocation(tuple(options), None, ())
    if argv[i] not in jobs:
        raise UserError(f"unknown job {argv[i]!r}; the jobs are {', '.join(jobs)} (fedspark --help)")
    return Invocation(tuple(options), argv[i], tuple(argv[i + 1:]))


def merged_options(ours: list[str], theirs: tuple[tuple[str, str | None], ...]) -> list[str]:
    """`ours` (flag, value, ...) then `theirs`, except that their --jars or --packages is appended
    to ours: spark-submit keeps only the last of each, and Delta's must stay."""
    merged = list(ours)
    for flag, value in theirs:
        if flag in SUBMIT_FLAGS.values() and flag in merged and value is not None:
            at = merged.index(flag) + 1
            merged[at] = f"{merged[at]},{value}"
        else:
            merged += [flag] if value is None else [flag, value]
    return merged


def delta_setting(job_args: tuple[str, ...]) -> str:
    """spark.delta_packages of the config the job's --config and --set describe ("auto" when they
    name none, or when that config does not load: the job itself then reports why, exit 2)."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--config")
    p.add_argument("--set", dest="sets", action="append", default=[])
    args, _ = p.parse_known_args(list(job_args))
    if args.config is None and not args.sets:
        return "auto"
    from pipelines.core.config import load_config

    try:
        return load_config(args.config, args.sets).spark.delta_packages
    except UserError:
        return "auto"


def command(invocation: Invocation, jobs: dict[str, Path], delta: str = "auto") -> list[str]:
    """The spark-submit command line that runs the invocation's job (`delta`: the
    spark.delta_packages setting, see delta_setting)."""
    assert invocation.job is not None  # main answers an invocation without a job with the usage
    ours = submit_args(delta)
    return [spark_submit(), *merged_options(ours, invocation.options), str(jobs[invocation.job]),
            *invocation.job_args]


def usage(jobs: dict[str, Path]) -> str:
    width = max(map(len, jobs), default=0)
    listing = "\n".join(
        textwrap.fill(f"{name:<{width}}  {synopsis(name, path)}", 100, initial_indent="  ",
                      subsequent_indent=" " * (width + 4), break_on_hyphens=False)
        for name, path in jobs.items())
    return (f"usage: fedspark [spark-submit options] JOB [job arguments]\n\n"
            f"Run pipelines/JOB.py through spark-submit with Delta Lake's jars and extensions.\n\n"
            f"jobs (fedspark JOB --help describes one):\n{listing}\n\n"
            "Options before JOB are spark-submit's and pass through (spark-submit --help lists them),\n"
            "e.g. fedspark --master spark://host:7077 --conf spark.executor.memory=4g train --config FILE;\n"
            "--jars and --packages add to Delta's. Spark logs at WARN: the job's --verbose, or\n"
            f"{LOG_LEVEL_VARIABLE}=INFO (any log4j level), brings its logs back. FEDSPARK_DELTA_PACKAGES=none\n"
            "leaves Delta's jars out (the cluster ships them).")


def main(argv: list[str] | None = None) -> int:
    """Build the command and become spark-submit (exec: its exit code and signals are the job's)."""
    argv = sys.argv[1:] if argv is None else argv
    jobs = find_jobs()
    try:
        invocation = split(argv, jobs)
        if invocation.job is None:
            helped = any(flag in HELP for flag, _ in invocation.options)
            print(usage(jobs), file=sys.stdout if helped else sys.stderr)
            return 0 if helped else EXIT_USER_ERROR
        requested_log_level()  # a bad FEDSPARK_LOG_LEVEL stops here, before a JVM starts
        delta = delta_setting(invocation.job_args)
        fetch_delta_jars(delta)
        argv_out = command(invocation, jobs, delta)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except DeltaFetchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    os.execve(argv_out[0], argv_out, submit_environment())


if __name__ == "__main__":
    raise SystemExit(main())
