"""Everything a training run reports, in one place: a console line per event (with an ETA and the
run id, never a data row), `metrics.jsonl`, the `runs` and `metrics` Delta tables, the plots, and
MLflow when `tracking.mlflow` is on.

Order matters for a job that may be killed at any point: metrics reach Delta *before* the checkpoint
that covers them is written, and the `completed` row before `summary.json`. A resumed attempt then
re-sends only records Delta has already seen (and skips, see pipelines/store/records.py), and a run with a
summary is always recorded as completed.
"""
from __future__ import annotations

import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pyspark.sql import SparkSession

from pipelines.core.config import Config, dump_yaml
from pipelines.core.errors import UserError
from pipelines.core.progress import clock
from pipelines.store import artifacts, plots, records
from pipelines.store.rundir import RunDir, is_remote


class Tracker:
    """One attempt of one run. `unit` is what the records count (`epoch` or `round`), `total` how
    many the run will have."""

    def __init__(self, spark: SparkSession, config: Config, run_dir: RunDir, unit: str, total: int,
                 table: str, version: int) -> None:
        self.spark, self.config, self.run_dir, self.unit, self.total = spark, config, run_dir, unit, total
        self.lake = config.lake.path
        self.names: dict[int, str] = {}      # client index -> name, for per-client metrics
        self.flushed = 0                     # records Delta already holds
        self._durations: list[float] = []
        self.info = records.RunInfo(
            run_id=run_dir.name, run_name=artifacts.run_name_of(run_dir),
            attempt=records.next_attempt(spark, self.lake, run_dir.name),
            strategy=config.trainer.strategy, data_table=table, data_version=version,
            started_at=datetime.now(timezone.utc).replace(tzinfo=None), run_dir=run_dir.uri,
            config=dump_yaml(config))
        records.started(spark, self.lake, self.info)
        self.event(f"run started: attempt {self.info.attempt}, {config.trainer.strategy} on "
                   f"{table}@{version}")

    def resumed(self, history: list[dict[str, Any]], where: str) -> None:
        """Continue from a restored checkpoint, whose records Delta already holds (they were sent
        before it was written)."""
        self.flushed = len(history)
        artifacts.rewrite_metrics(self.run_dir, history)
        self.event(f"resuming {self.run_dir} after {where}")

    @property
    def run_id(self) -> str:
        return self.info.run_id

    def event(self, text: str) -> None:
        """One console line per event, tagged with the run id."""
        print(f"{text}  [run {self.run_id}]", flush=True)

    def log(self, record: dict[str, Any], line: str) -> None:
        """An epoch's or round's record: its line (with the time left at this pace) and jsonl."""
        self._durations.append(float(record.get("seconds", 0.0)))
        left = self.total - int(record[self.unit])
        eta = sum(self._durations) / len(self._durations) * left
        self.event(f"{line}  eta {clock(eta)}")
        artifacts.append_metrics(self.run_dir, record)

    def flush(self, history: list[dict[str, Any]]) -> None:
        """Send the records Delta does not have yet; call before writing a checkpoint."""
        records.append_metrics(self.spark, self.lake, self.run_id, self.unit,
                               history[self.flushed:], self.names)
        self.flushed = len(history)

    def checkpoint(self, history: list[dict[str, Any]], name: str, arrays: dict, meta: dict) -> None:
        self.flush(history)
        artifacts.save_checkpoint(self.run_dir, name, arrays, meta)

    def completed(self, summary: dict[str, Any], history: list[dict[str, Any]], classifier: bool
                  ) -> None:
        """Metrics, plots, MLflow, then the `completed` row; summary.json is the caller's last write."""
        self.flush(history)
        written = plots.save_run_plots(self.run_dir.local, history, self.unit, classifier)
        self.run_dir.publish(*(path.name for path in written))
        if self.config.tracking.mlflow:
            log_to_mlflow(self.config, self.run_dir, summary, history, self.unit)
        records.ended(self.spark, self.lake, self.info, "completed", summary)

    def failed(self, exc: BaseException) -> None:
        """Best effort: the job is already failing, and its own error is the one to show."""
        try:
            records.ended(self.spark, self.lake, self.info, "failed",
                          error=f"{type(exc).__name__}: {exc}"[:2000])
        except Exception as record_exc:  # noqa: BLE001
            print(f"warning: could not record the failure in the runs table: {record_exc}", flush=True)


# --- MLflow ----------------------------------------------------------------------------------------

def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def log_to_mlflow(config: Config, run_dir: RunDir, summary: dict[str, Any],
                  history: list[dict[str, Any]], unit: str) -> str:
    """One MLflow run per completed fedspark run: the config as params, every record's numbers as
    metrics by step, and the model, plots and summary as artifacts. Without MLFLOW_TRACKING_URI the
    store is MLflow's local file store under runs.path, or ./mlruns when runs.path is a Hadoop URI
    (MLflow's file store is local only). Returns MLflow's run id."""
    try:
        import mlflow
    except ImportError as exc:
        raise UserError("tracking.mlflow: true needs MLflow: pip install 'fedspark[tracking]' "
                        "(mlflow-skinny), or set tracking.mlflow: false") from exc
    if "MLFLOW_TRACKING_URI" not in os.environ:
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks to opt in
        root = Path(".") if is_remote(config.runs.path) else Path(config.runs.path)
        mlflow.set_tracking_uri(root.resolve().joinpath("mlruns").as_uri())
    mlflow.set_experiment("fedspark")
    params = _flat(config.redacted().to_dict())
    with mlflow.start_run(run_name=run_dir.name, tags={"fedspark.run_id": run_dir.name}) as run:
        mlflow.log_params({k: str(v)[:500] for k, v in params.items()})
        for row in records.metric_rows(run_dir.name, unit, history):
            _, _, step, name, value = row
            mlflow.log_metric(name.replace("/", "."), value, step=step)
        final = {k: float(v) for k, v in summary.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool)}
        mlflow.log_metrics(final)
        mlflow.log_artifacts(str(run_dir.local / "model"), artifact_path="model")
        for name in ("curves.png", "clients.png", "config.yaml"):
            if (run_dir.local / name).is_file():
                mlflow.log_artifact(str(run_dir.local / name))
        mlflow.log_dict(summary, "summary.json")
        return run.info.run_id
