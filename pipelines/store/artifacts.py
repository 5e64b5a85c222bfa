"""Run directories, saved models and checkpoints: numpy `.npz` loaded with allow_pickle=False and JSON
metadata, each written to a temporary name and renamed into place so a reader never sees half a file.

    <runs.path>/<run_id>/
        config.yaml      the resolved configuration
        model/           weights.npz + spec.json
        run.json         run id and name
        metrics.jsonl    one record per epoch or round
        curves.png       loss and accuracy per epoch or round (clients.png: federated clients)
        checkpoints/     epoch-NNNN / round-NNNN .npz + .json
        summary.json     the summary line, written last: a run with it is finished

runs.path may be a Hadoop URI: every function here works on a runstore.RunDir, writing its local
files and then publishing them (copied to the URI, atomically) in the order written.
"""
from __future__ import annotations

import json
import os
import re
import time
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.core.errors import UserError
from pipelines.store import rundir
from pipelines.store.rundir import RunDir
from udfs import adapters
from udfs.core import files
from udfs.core.files import atomic_write
from udfs.core.models import Model
from udfs.core.seeding import SECRET_BYTES

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def write(run_dir: RunDir, rel: str, data: bytes) -> None:
    """One file of a run, whole or not at all, at its local path and then at the run's URI."""
    atomic_write(run_dir.file(rel), data)
    run_dir.publish(rel)


# beside the checkpoints, never in model/: the run's secret for central DP's noise and sampling
NOISE_SECRET = "checkpoints/noise.key"


def noise_secret(run_dir: RunDir) -> bytes:
    """The run's secret for its DP noise and DP client sampling: OS entropy at the run's first
    start, stored mode 0600 beside the checkpoints (never in model/, the summary, the records or
    MLflow), read back by a resume so a resumed run ends at the same model."""
    found = run_dir.read(NOISE_SECRET)
    if found is not None:
        return found
    secret = os.urandom(SECRET_BYTES)
    atomic_write(run_dir.file(NOISE_SECRET), secret, private=True)
    run_dir.publish(NOISE_SECRET, private=True)
    return secret


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    import io

    buf = io.BytesIO()
    # numeric arrays only: an object array would need pickle to load, and stored artifacts load
    # with allow_pickle=False, so refuse it here rather than write what cannot be read back
    np.savez(buf, allow_pickle=False, **arrays)
    return buf.getvalue()


RUN_FILE = "run.json"


def check_run_name(name: str) -> str:
    if not _NAME.match(name):
        raise UserError(f"--run-name {name!r}: use letters, digits, '.', '_' and '-'")
    return name


def new_run_dir(runs_path: str, run_name: str | None, label: str) -> RunDir:
    """Create a run directory `<name or label>-<UTC time>` (made unique) holding run.json, which
    records the run's name: scheduled jobs find their runs by it."""
    prefix = check_run_name(run_name) if run_name else label
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    for i in range(1000):
        name = f"{prefix}-{stamp}" if i == 0 else f"{prefix}-{stamp}-{i}"
        info = json.dumps({"run_id": name, "run_name": run_name, "created": time.time()}).encode()
        run_dir = rundir.claim_run(runs_path, name, RUN_FILE, info)
        if run_dir is not None:
            atomic_write(run_dir.file(RUN_FILE), info)  # a remote run's claim wrote it there
            return run_dir
    raise RuntimeError(f"cannot create a unique run directory under {runs_path}")


def run_name_of(run_dir: RunDir) -> str | None:
    try:
        return json.loads(run_dir.read(RUN_FILE) or b"").get("run_name")
    except (OSError, ValueError):
        return None


def newest_run(runs_path: str, run_name: str) -> RunDir | None:
    """The most recently created run directory with that name, finished or not."""
    found = []
    for name, data in rundir.run_files(runs_path, RUN_FILE):
        try:
            info = json.loads(data)
        except ValueError:
            continue
        if info.get("run_name") == run_name:
            found.append((info.get("created", 0.0), name))
    return rundir.open_run(rundir.join(str(runs_path), max(found)[1])) if found else None


def save_model(run_dir: RunDir, spec: Model, theta: np.ndarray | None,
               metadata: dict[str, Any]) -> str:
    """weights.npz, the model's own files (a PyTorch module's state_dict in safetensors and its
    source), then spec.json; without weights (an MLlib model saved by MLlib beside them) only
    spec.json, which says so. Returns the model directory's URI (or path)."""
    if theta is not None:
        write(run_dir, "model/weights.npz", _npz_bytes({"theta": theta}))
        for name, data in spec.files(theta).items():
            write(run_dir, f"model/{name}", data)
    _write_spec(run_dir, spec, str(theta.dtype) if theta is not None else None,
                {} if theta is not None else {"format": "mllib", "mllib_path": run_dir.child("model/mllib")},
                metadata)
    return run_dir.child("model")


def save_model_chunks(run_dir: RunDir, spec: Model, dtype: str, chunks: Iterable[np.ndarray],
                      metadata: dict[str, Any]) -> str:
    """save_model for weights that arrive in consecutive pieces of the flat vector (a model-parallel
    model, one feature block at a time): the same weights.npz, never whole in memory."""
    stream_npz(run_dir.file("model/weights.npz"), {"theta": (dtype, spec.n_params, chunks)})
    run_dir.publish("model/weights.npz")
    _write_spec(run_dir, spec, dtype, {}, metadata)
    return run_dir.child("model")


def _write_spec(run_dir: RunDir, spec: Model, dtype: str | None, extra: dict[str, Any],
                metadata: dict[str, Any]) -> None:
    meta = {**spec.describe(), "n_params": spec.n_params,
            "dtype": dtype, **extra, **metadata}
    write(run_dir, "model/spec.json", json.dumps(meta, indent=2).encode())


def stream_npz(path: Path, members: dict[str, tuple[str, int, Iterable[np.ndarray]]]) -> None:
    """An uncompressed .npz of 1-D arrays, each written chunk by chunk as the chunks arrive, so
    np.load reads it like np.savez's but no writer ever holds a whole array."""
    with files.replacing(path) as out, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED,
                                                        allowZip64=True) as zf:
        for name, (dtype, length, chunks) in members.items():
            with zf.open(f"{name}.npy", "w", force_zip64=True) as fh:
                np.lib.format.write_array_header_2_0(fh, {
                    "descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                    "fortran_order": False, "shape": (length,)})
                written = 0
                for chunk in chunks:
                    fh.write(np.ascontiguousarray(chunk, dtype=dtype).tobytes())
                    written += chunk.size
                if written != length:
                    raise RuntimeError(f"{path}: {name} got {written} values, expected {length}")


def read_npz_slice(path: Path, name: str, start: int, stop: int) -> np.ndarray:
    """Values start..stop of the 1-D array `name` of an uncompressed .npz (stream_npz's or
    np.savez's), read without loading the rest."""
    with zipfile.ZipFile(path) as zf, zf.open(f"{name}.npy") as fh:
        version = np.lib.format.read_magic(fh)
        read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                       else np.lib.format.read_array_header_2_0)
        shape, _, dtype = read_header(fh)
        if len(shape) != 1 or not 0 <= start <= stop <= shape[0]:
            raise UserError(f"{path}: {name} has shape {shape}; cannot read [{start}, {stop})")
        fh.seek(fh.tell() + start * dtype.itemsize)
        return np.frombuffer(fh.read((stop - start) * dtype.itemsize), dtype=dtype).copy()


def load_model(model_or_run_dir: str | Path) -> tuple[Model, np.ndarray, dict[str, Any]]:
    """A saved model from its run directory or its model/ directory (a path or a URI)."""
    run_dir = rundir.open_run(model_or_run_dir)
    try:
        return _load_model(run_dir, "model/" if run_dir.exists("model") else "")
    finally:
        run_dir.close()


def _load_model(run_dir: RunDir, prefix: str) -> tuple[Model, np.ndarray, dict[str, Any]]:
    spec_file, weights_file = run_dir.child(f"{prefix}spec.json"), run_dir.child(f"{prefix}weights.npz")
    spec_json = run_dir.read(f"{prefix}spec.json")
    weights = run_dir.fetch(f"{prefix}weights.npz")
    if spec_json is not None and weights is None:
        meta = json.loads(spec_json)
        if meta.get("format") == "mllib":
            raise UserError(f"{run_dir}: this model is MLlib's own ({meta['kind']} with sigmoid hidden "
                            f"units), saved at {meta['mllib_path']}: load it with pyspark.ml "
                            "(MultilayerPerceptronClassificationModel.load)")
    if spec_json is None or weights is None:
        raise UserError(f"{run_dir}: no saved model (expected {spec_file} and {weights_file})")
    meta = json.loads(spec_json)
    with np.load(weights, allow_pickle=False) as z:
        theta = z["theta"]
    try:
        spec = adapters.from_description(meta, lambda name: run_dir.read(f"{prefix}{name}"))
    except (OSError, ValueError) as exc:
        raise UserError(f"{spec_file}: {exc}") from None
    if theta.shape != (spec.n_params,):
        raise UserError(f"{weights_file}: holds {theta.shape} parameters, spec.json describes "
                        f"{spec.n_params}")
    return spec, theta, meta


def append_metrics(run_dir: RunDir, record: dict[str, Any]) -> None:
    with open(run_dir.file("metrics.jsonl"), "a") as fh:
        fh.write(json.dumps(record) + "\n")
    run_dir.publish("metrics.jsonl")


def rewrite_metrics(run_dir: RunDir, history: list[dict[str, Any]]) -> None:
    """metrics.jsonl as of a restored checkpoint: drops lines a killed attempt wrote after it."""
    write(run_dir, "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in history).encode())


def save_checkpoint(run_dir: RunDir, name: str, arrays: dict[str, np.ndarray], meta: dict) -> None:
    """checkpoints/<name>.npz then <name>.json; a name ends in its epoch, step or round number
    (epoch-0003), which orders them."""
    write(run_dir, f"checkpoints/{name}.npz", _npz_bytes(arrays))
    # the JSON is written second: a checkpoint counts only once both files are there
    write(run_dir, f"checkpoints/{name}.json", json.dumps(meta).encode())


def save_checkpoint_chunks(run_dir: RunDir, name: str,
                           members: dict[str, tuple[str, int, Iterable[np.ndarray]]], meta: dict) -> None:
    """save_checkpoint for arrays that arrive in pieces (stream_npz): the same two files."""
    stream_npz(run_dir.file(f"checkpoints/{name}.npz"), members)
    run_dir.publish(f"checkpoints/{name}.npz")
    write(run_dir, f"checkpoints/{name}.json", json.dumps(meta).encode())


def _number(name: str) -> int:
    tail = name.removesuffix(".json").rpartition("-")[2]
    return int(tail) if tail.isdigit() else -1


def latest_checkpoint_file(run_dir: RunDir) -> tuple[Path, dict] | None:
    """The last complete checkpoint's .npz (a local file: a remote run's is copied to its staging
    directory) and its metadata."""
    metas = sorted((n for n in run_dir.names("checkpoints") if n.endswith(".json")), key=_number)
    if not metas:
        return None
    stem = metas[-1].removesuffix(".json")
    meta_bytes = run_dir.read(f"checkpoints/{stem}.json")
    npz = run_dir.fetch(f"checkpoints/{stem}.npz")
    if meta_bytes is None or npz is None:   # the .json is written last: both were there
        raise FileNotFoundError(f"checkpoint {stem} of {run_dir} disappeared while being read")
    return npz, json.loads(meta_bytes)


def latest_checkpoint(run_dir: RunDir) -> tuple[dict[str, np.ndarray], dict] | None:
    found = latest_checkpoint_file(run_dir)
    if found is None:
        return None
    with np.load(found[0], allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    return arrays, found[1]
