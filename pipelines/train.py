"""spark-submit pipelines/train.py --config FILE [--set KEY=VALUE ...] [--run-name NAME]
                                  [--resume RUN_DIR | --resume-if-exists]

Train a model on a Delta table with the configured strategy, save it in a run directory and print
one progress line per epoch, then the summary JSON object as the last line of stdout.
"""
from __future__ import annotations

if __package__ in (None, ""):  # run as a script by spark-submit: make the project importable
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import contextlib
import json
from pathlib import Path

from pipelines.core.cli import add_verbose, main_wrapper, print_summary, process_start_time
from pipelines.core.session import build_session
from pipelines.model_parallel import vertical
from pipelines.store import locks, rundir
from pipelines.training.runners import interrupted_run, resolve_run, run


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="train.py", description=__doc__.split("\n\n")[1])
    p.add_argument("--config", help="experiment YAML (default: conf/fashion_mnist.yaml)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (YAML value), e.g. --set trainer.epochs=2")
    p.add_argument("--run-name", help="name the run (its id is NAME-<UTC time>); one job per name "
                   "at a time")
    resume = p.add_mutually_exclusive_group()
    resume.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last checkpoint")
    resume.add_argument("--resume-if-exists", action="store_true",
                        help="with --run-name: continue the newest run of that name if it was "
                             "interrupted; start a new run otherwise")
    add_verbose(p)
    args = p.parse_args(argv)
    if args.resume_if_exists and not args.run_name:
        p.error("--resume-if-exists needs --run-name (the run to look for)")
    return args


def main(argv: list[str], wire_log: list | None = None) -> None:
    """`wire_log`, a list, records what a model_parallel run's label owner exchanges with the
    cells (for tests: what crosses between parties)."""
    started = process_start_time()
    args = parse_args(argv)
    config, resume_dir, run_name = resolve_run(args)
    if config.trainer.strategy == "model_parallel":
        vertical.parse(config.model_parallel)  # bad parties stop the job before Spark starts
    if rundir.is_remote(config.runs.path):  # the run store goes through Spark's JVM
        build_session("fedspark-train", config.spark.conf, config.spark.delta_packages)
    with locks.lock_run_name(config.runs.path, run_name) if run_name else contextlib.nullcontext():
        if args.resume_if_exists:
            assert run_name is not None  # parse_args refuses --resume-if-exists without --run-name
            resume_dir = interrupted_run(config, run_name)
        if resume_dir is not None:
            summary = resume_dir.read("summary.json")
            if summary is not None:
                resume_dir.close()
                print_summary(json.loads(summary))
                return
        run(config, args, resume_dir, started, wire_log)


if __name__ == "__main__":
    raise SystemExit(main_wrapper(main))
