"""What every spark-submit entry point shares: the exit codes, the --verbose option and the one line
a job ends with."""
from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from pipelines.core.errors import EXIT_FAILURE, EXIT_OK, EXIT_USER_ERROR, UserError
from pipelines.core.session import LOG_LEVEL_VARIABLE


class _Verbose(argparse.Action):
    """--verbose: Spark's logs at INFO unless FEDSPARK_LOG_LEVEL names a level. It sets the variable
    as soon as it is parsed, because that is where the session (and the JVM it may start) reads the
    level, before any Spark start-up line is logged."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=False, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        if not os.environ.get(LOG_LEVEL_VARIABLE):
            os.environ[LOG_LEVEL_VARIABLE] = "INFO"
        setattr(namespace, self.dest, True)


def add_verbose(parser: argparse.ArgumentParser) -> None:
    """The option every job has: show Spark's own logs (the console is quiet by default)."""
    parser.add_argument("--verbose", action=_Verbose,
                        help=f"show Spark's logs at INFO (or at the level {LOG_LEVEL_VARIABLE} names); "
                             "by default they are at WARN")


def main_wrapper(main: Callable[[list[str]], None], argv: list[str] | None = None) -> int:
    """Run a job's main; map a UserError to exit 2 and anything else to exit 1, with one clear line
    on stderr (and the traceback for unexpected failures)."""
    try:
        main(sys.argv[1:] if argv is None else argv)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except SystemExit as exc:  # argparse: 2 for bad arguments, 0 for --help
        return int(exc.code or 0)
    except Exception as exc:  # noqa: BLE001 - the job's last line of defence
        traceback.print_exc()
        print(f"error: the job failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


def print_summary(summary: dict[str, Any]) -> None:
    """The last line of stdout: one JSON object."""
    print(json.dumps(summary, sort_keys=False), flush=True)


def process_start_time() -> float:
    """Wall-clock time this job's process started. Under spark-submit the job is the JVM that
    launched this Python, so its start counts (Linux /proc; falls back to now elsewhere)."""
    import os
    import time

    try:
        boot = next(float(line.split()[1]) for line in open("/proc/stat") if line.startswith("btime"))
        ticks = os.sysconf("SC_CLK_TCK")

        def started(pid: int) -> float:
            fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
            return boot + int(fields[19]) / ticks

        pid = os.getppid() if "PYSPARK_GATEWAY_PORT" in os.environ else os.getpid()
        return started(pid)
    except (OSError, StopIteration, ValueError, IndexError):
        return time.time()
