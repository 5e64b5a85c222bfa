"""A run's plots, drawn from its per-epoch or per-round records: `curves.png` (loss and accuracy,
training against validation or test) and, for federated runs, `clients.png` (how accuracy is spread
over the clients). Each PNG carries the series it shows, read back from the drawn axes, in a text
chunk named `fedspark:series`, so a reader can check a plot against the numbers it came from.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast

import matplotlib
import numpy as np

matplotlib.use("Agg")  # no display on executors, CI or cron

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from udfs.core import files  # noqa: E402

SERIES_KEY = "fedspark:series"
# (panel title, y label, [(record key, legend label)])
CLASSIFIER_PANELS = [
    ("loss", "loss", [("train_loss", "train"), ("val_loss", "validation"), ("test_loss", "test")]),
    ("accuracy", "accuracy", [("val_accuracy", "validation"), ("test_accuracy", "test"),
                              ("client_accuracy.mean", "clients (mean)")]),
]
REGRESSION_PANELS = [
    ("loss (mean squared error)", "loss", [("train_loss", "train"), ("val_loss", "validation"),
                                           ("test_loss", "test")]),
    ("RMSE", "rmse", [("val_rmse", "validation"), ("test_rmse", "test")]),
]


def _value(record: dict[str, Any], key: str) -> float | None:
    outer, _, inner = key.partition(".")
    value = record.get(outer)
    if inner:
        value = value.get(inner) if isinstance(value, dict) else None
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def curves(history: list[dict[str, Any]], unit: str, classifier: bool) -> Figure:
    """Loss and accuracy (or RMSE) against the epoch or round, one line per series the run has."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), layout="constrained")
    for ax, (title, ylabel, series) in zip(axes, CLASSIFIER_PANELS if classifier else REGRESSION_PANELS, strict=False):
        for key, label in series:
            points = [(r[unit], v) for r in history if (v := _value(r, key)) is not None]
            if points:
                xs, ys = zip(*points, strict=False)
                ax.plot(xs, ys, marker="o" if len(points) < 30 else None, markersize=3,
                        label=label, gid=key)
        ax.set(title=title, xlabel=unit, ylabel=ylabel)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
    return fig


def clients(history: list[dict[str, Any]]) -> Figure | None:
    """The last evaluated round's per-client accuracies as a histogram, and mean, 10th percentile and
    minimum over the rounds. None when no round measured clients (e.g. under DP, which withholds
    them)."""
    evaluated = [r for r in history if r.get("client_accuracies")]
    if not evaluated:
        return None
    fig, (hist_ax, line_ax) = plt.subplots(1, 2, figsize=(10, 4), layout="constrained")
    last = evaluated[-1]
    hist_ax.hist(last["client_accuracies"], bins=min(20, max(5, len(last["client_accuracies"]) // 3)),
                 range=(0.0, 1.0), color="tab:blue", edgecolor="white")
    hist_ax.set(title=f"client accuracy, round {last['round']} ({len(last['client_accuracies'])} clients)",
                xlabel="accuracy on the client's hold-out", ylabel="clients")
    for stat in ("mean", "p10", "min"):
        line_ax.plot([r["round"] for r in evaluated], [r["client_accuracy"][stat] for r in evaluated],
                     label=stat, gid=f"client_accuracy.{stat}")
    line_ax.set(title="client accuracy over rounds", xlabel="round", ylabel="accuracy")
    line_ax.grid(alpha=0.3)
    line_ax.legend()
    return fig


def drawn_series(fig: Figure) -> dict[str, Any]:
    """What the figure actually shows: every line's (x, y) by its record key, and histogram counts."""
    out: dict[str, Any] = {}
    for ax in fig.axes:
        for line in ax.lines:
            gid = line.get_gid()
            if gid is None:
                raise ValueError(f"a line of {ax.get_title()!r} has no gid (its record key)")
            xs, ys = np.asarray(line.get_xdata()), np.asarray(line.get_ydata())
            out[gid] = [[float(x), float(y)] for x, y in zip(xs, ys, strict=True)]
        if ax.patches:
            # ax.hist draws its bars as Rectangles; Axes.patches is typed as plain Patches
            bars = cast(list[Rectangle], list(ax.patches))
            out["histogram"] = {"counts": [float(p.get_height()) for p in bars],
                                "title": ax.get_title()}
    return out


def save(fig: Figure, path: Path) -> None:
    """Write the PNG atomically, with the drawn series in its metadata."""
    try:
        with files.replacing(path) as fh:
            fig.savefig(fh, format="png", dpi=100,
                        metadata={SERIES_KEY: json.dumps(drawn_series(fig))})
    finally:
        plt.close(fig)


def save_run_plots(run_dir: Path, history: list[dict[str, Any]], unit: str, classifier: bool) -> list[Path]:
    """curves.png, and clients.png when the run measured its clients."""
    written = []
    if history:
        save(curves(history, unit, classifier), run_dir / "curves.png")
        written.append(run_dir / "curves.png")
    fig = clients(history) if unit == "round" else None
    if fig is not None:
        save(fig, run_dir / "clients.png")
        written.append(run_dir / "clients.png")
    return written
