"""pipelines/ingest.py end to end: real Spark, real Delta, the job called in-process through
main_wrapper exactly as spark-submit would call it. Every reference value is computed in the test
from the bytes the test wrote, never by calling the code under test."""
from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path

import numpy as np
import pytest

from pipelines import ingest
from pipelines.core.cli import main_wrapper

TRAIN_IMAGES = "train-images-idx3-ubyte.gz"
TRAIN_LABELS = "train-labels-idx1-ubyte.gz"
TEST_IMAGES = "t10k-images-idx3-ubyte.gz"
TEST_LABELS = "t10k-labels-idx1-ubyte.gz"
IMAGES_MAGIC = 0x00000803
LABELS_MAGIC = 0x00000801


# --- helpers -------------------------------------------------------------------------------------

def run(capsys, source: str, table: str, lake_dir: Path, *extra: str) -> tuple[int, str, str]:
    """Run the ingest job in-process; the exit code and what it printed."""
    capsys.readouterr()  # drop anything printed before
    code = main_wrapper(ingest.main, ["--source", source, "--table", table,
                                      "--set", f"lake.path={lake_dir}", *extra])
    out, err = capsys.readouterr()
    return code, out, err


def summary_of(out: str) -> dict:
    lines = [line for line in out.splitlines() if line.strip()]
    assert lines, "the job printed nothing on stdout"
    summary = json.loads(lines[-1])
    for key in ("table", "version", "skipped", "rows", "rejected"):
        assert key in summary, f"summary lacks {key!r}: {summary}"
    return summary


def load(spark, lake_dir: Path, name: str, version: int | None = None):
    reader = spark.read.format("delta")
    if version is not None:
        reader = reader.option("versionAsOf", version)
    return reader.load(str(lake_dir / name))


def commit_files(table_dir: Path) -> list[str]:
    log = table_dir / "_delta_log"
    return sorted(p.name for p in log.glob("*.json")) if log.is_dir() else []


def history_count(spark, table_dir: Path) -> int:
    from delta.tables import DeltaTable

    return DeltaTable.forPath(spark, str(table_dir)).history().count()


def idx_bytes(magic: int, shape: tuple[int, ...], data: bytes) -> bytes:
    return struct.pack(">I", magic) + struct.pack(f">{len(shape)}I", *shape) + data


def write_gz(path: Path, payload: bytes) -> None:
    with gzip.open(path, "wb") as fh:
        fh.write(payload)


def make_idx_dir(root: Path, n_train: int = 6, n_test: int = 3, rows: int = 2, cols: int = 3,
                 seed: int = 0) -> tuple[Path, dict]:
    """Four gzipped IDX files with the standard names; returns the directory and the raw arrays."""
    rng = np.random.default_rng(seed)
    directory = root / "idx"
    directory.mkdir()
    data = {}
    for split, n, img_name, lab_name in (("train", n_train, TRAIN_IMAGES, TRAIN_LABELS),
                                         ("test", n_test, TEST_IMAGES, TEST_LABELS)):
        images = rng.integers(0, 256, size=(n, rows, cols), dtype=np.uint8)
        images.flat[0] = 0
        images.flat[-1] = 255  # both ends of the scale appear
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        write_gz(directory / img_name, idx_bytes(IMAGES_MAGIC, (n, rows, cols), images.tobytes()))
        write_gz(directory / lab_name, idx_bytes(LABELS_MAGIC, (n,), labels.tobytes()))
        data[split] = (images, labels)
    return directory, data


def write_text(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


# --- 1. IDX --------------------------------------------------------------------------------------

def test_idx_ingest_rows_ids_scaling_and_schema(spark, lake_dir, tmp_path, capsys):
    directory, data = make_idx_dir(tmp_path)
    code, out, err = run(capsys, f"idx:{directory}", "t", lake_dir, "--classes", "10")
    assert code == 0, err

    summary = summary_of(out)
    assert summary["table"] == "t"
    assert summary["version"] == 0
    assert summary["skipped"] is False
    assert summary["rows"] == 9
    assert summary["rejected"] == 0

    df = load(spark, lake_dir, "t")
    types = dict(df.dtypes)
    assert types["id"] == "bigint"
    assert types["features"] == "array<float>"
    assert types["label"] == "int"
    assert types["split"] == "string"
    assert set(df.columns) == {"id", "features", "label", "split"}

    rows = sorted(df.collect(), key=lambda r: r.id)
    assert [r.id for r in rows] == list(range(9))

    train_images, train_labels = data["train"]
    test_images, test_labels = data["test"]
    images = np.concatenate([train_images, test_images]).reshape(9, -1)
    labels = np.concatenate([train_labels, test_labels])
    splits = ["train"] * 6 + ["test"] * 3
    for i, row in enumerate(rows):
        expected = images[i].astype(np.float64) / 255.0
        got = np.asarray(row.features, dtype=np.float64)
        assert got.shape == (6,)
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-7)
        assert row.label == int(labels[i])
        assert row.split == splits[i]
    all_features = np.array([r.features for r in rows])
    assert all_features.min() == 0.0 and all_features.max() == 1.0
    assert not (lake_dir / "t_rejects").exists()


# --- 2. IDX errors -------------------------------------------------------------------------------

def _assert_nothing_written(lake_dir: Path, name: str = "t") -> None:
    assert not (lake_dir / name / "_delta_log").exists()
    assert not (lake_dir / f"{name}_rejects" / "_delta_log").exists()


@pytest.mark.parametrize("name, magic", [
    (TRAIN_IMAGES, 0x00000801),   # labels magic on an images file
    (TEST_LABELS, 0x00000803),    # images magic on a labels file
    (TRAIN_LABELS, 0x12345678),   # not IDX at all
])
def test_idx_wrong_magic_is_exit_2_naming_the_file(spark, lake_dir, tmp_path, capsys, name, magic):
    directory, data = make_idx_dir(tmp_path)
    path = directory / name
    with gzip.open(path, "rb") as fh:
        payload = fh.read()
    write_gz(path, struct.pack(">I", magic) + payload[4:])

    code, out, err = run(capsys, f"idx:{directory}", "t", lake_dir)
    assert code == 2, err
    assert name in err
    assert "magic" in err.lower()
    _assert_nothing_written(lake_dir)


@pytest.mark.parametrize("name", [TRAIN_IMAGES, TEST_IMAGES])
def test_idx_truncated_images_is_exit_2_naming_the_file(spark, lake_dir, tmp_path, capsys, name):
    directory, _ = make_idx_dir(tmp_path)
    path = directory / name
    with gzip.open(path, "rb") as fh:
        payload = fh.read()
    write_gz(path, payload[:-5])  # header still says n*2*3 bytes of pixels

    code, out, err = run(capsys, f"idx:{directory}", "t", lake_dir)
    assert code == 2, err
    assert name in err
    assert "truncated" in err.lower()
    _assert_nothing_written(lake_dir)


def test_idx_truncated_gzip_stream_is_exit_2_naming_the_file(spark, lake_dir, tmp_path, capsys):
    directory, _ = make_idx_dir(tmp_path)
    path = directory / TRAIN_IMAGES
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])  # the gzip stream itself ends early

    code, out, err = run(capsys, f"idx:{directory}", "t", lake_dir)
    assert code == 2, err
    assert TRAIN_IMAGES in err
    _assert_nothing_written(lake_dir)


def test_idx_image_and_label_counts_differ_is_exit_2(spark, lake_dir, tmp_path, capsys):
    directory, _ = make_idx_dir(tmp_path)
    write_gz(directory / TRAIN_LABELS, idx_bytes(LABELS_MAGIC, (5,), bytes([1, 2, 3, 4, 5])))

    code, out, err = run(capsys, f"idx:{directory}", "t", lake_dir)
    assert code == 2, err
    assert TRAIN_LABELS in err
    assert "6" in err and "5" in err
    _assert_nothing_written(lake_dir)


def test_idx_missing_file_is_exit_2(spark, lake_dir, tmp_path, capsys):
    directory, _ = make_idx_dir(tmp_path)
    (directory / TEST_LABELS).unlink()

    code, out, err = run(capsys, f"idx:{directory}", "t", lake_dir)
    assert code == 2, err
    assert "t10k-labels-idx1-ubyte" in err
    _assert_nothing_written(lake_dir)


# --- 3. CSV validation and rejects ---------------------------------------------------------------

# (line as written, reason fragment) — None for a good row. Line numbers are 1-based, header = 1.
CSV_LINES: list[tuple[str, str | None]] = [
    ("label,f0,f1,f2", None),        # 1 header
    ("0,0.1,0.2,0.3", None),         # 2 good
    ("1,1.5,-2,3e2", None),          # 3 good
    ("2,0.5,0.5", "columns"),        # 4 too few columns
    ("1,0.1,0.2,0.3,0.4", "columns"),  # 5 too many columns
    ("0,abc,0.2,0.3", "not a number"),  # 6 non-numeric feature
    ("", None),                      # 7 blank line: skipped, but it still counts as a line
    ("1,0.1,NaN,0.3", "NaN"),        # 8 NaN feature
    ("7,0.1,0.2,0.3", "outside"),    # 9 label outside --classes 3
    ("1.5,0.1,0.2,0.3", "integer"),  # 10 label not an integer
    ("x,0.1,0.2,0.3", "integer"),    # 11 label not a number at all
    ("2, 4 ,5,6", None),             # 12 good (cells are trimmed)
]


def test_csv_good_rows_land_and_every_bad_row_is_rejected(spark, lake_dir, tmp_path, capsys):
    csv = write_text(tmp_path / "data.csv", [line for line, _ in CSV_LINES])
    code, out, err = run(capsys, f"csv:{csv}", "t", lake_dir, "--label", "label", "--classes", "3")
    assert code == 0, err

    bad = {n: (line, why) for n, (line, why) in enumerate(CSV_LINES, start=1) if why}
    good = [(2, 0, [0.1, 0.2, 0.3]), (3, 1, [1.5, -2.0, 300.0]), (12, 2, [4.0, 5.0, 6.0])]

    summary = summary_of(out)
    assert summary["table"] == "t"
    assert summary["skipped"] is False
    assert summary["rows"] == len(good)
    assert summary["rejected"] == len(bad) == 7

    df = load(spark, lake_dir, "t")
    types = dict(df.dtypes)
    assert types["id"] == "bigint" and types["features"] == "array<float>"
    assert types["label"] == "int" and types["split"] == "string"
    rows = df.collect()
    assert len(rows) == len(good)
    assert len({r.id for r in rows}) == len(rows)
    got = sorted((r.label, [round(v, 5) for v in r.features]) for r in rows)
    assert got == sorted((label, feats) for _, label, feats in good)
    assert {r.split for r in rows} <= {"train", "test"}

    rejects = load(spark, lake_dir, "t_rejects")
    assert dict(rejects.dtypes) == {"source": "string", "row_number": "bigint", "raw": "string",
                                    "reason": "string"}
    by_line = {r.row_number: r for r in rejects.collect()}
    assert sorted(by_line) == sorted(bad)
    for n, (line, why) in bad.items():
        r = by_line[n]
        assert r.source == f"csv:{csv}"
        assert r.raw == line
        assert why.lower() in r.reason.lower(), (n, line, r.reason)
    assert "abc" in by_line[6].reason
    assert "7" in by_line[9].reason
    assert "7 row(s) rejected" in out


def test_values_spark_parses_but_training_cannot_use_are_rejects(spark, lake_dir, tmp_path, capsys):
    """A new user's 500-row CSV with --classes 2: a label past the int range, infinite features,
    a float32 overflow and a 5 MB run of digits each become a reject naming its fault; the other
    rows land."""
    lines = ["label,f0,f1"] + [f"{i % 2},{i / 10},{-i / 10}" for i in range(500)]
    hostile = {2: ("3000000000,0.5,0.5", "label 3000000000 outside the declared classes 0..1"),
               3: ("1,inf,0.5", "feature 0 is not a finite float32: 'inf'"),
               4: ("0,0.5,-inf", "feature 1 is not a finite float32: '-inf'"),
               5: ("1,1e39,0.5", "feature 0 is not a finite float32: '1e39'"),
               6: ("0,0.5," + "9" * 5_000_000, "feature 1 is not a finite float32: '" + "9" * 40 + "...'")}
    for n, (line, _) in hostile.items():
        lines[n - 1] = line
    csv = write_text(tmp_path / "hostile.csv", lines)
    code, out, err = run(capsys, f"csv:{csv}", "h", lake_dir, "--classes", "2")
    assert code == 0, err[-2000:]
    assert summary_of(out)["rows"] == 500 - len(hostile) and summary_of(out)["rejected"] == len(hostile)
    reasons = {r.row_number: r.reason for r in load(spark, lake_dir, "h_rejects").collect()}
    assert reasons == {n: why for n, (_, why) in hostile.items()}
    features = np.array([r.features for r in load(spark, lake_dir, "h").collect()])
    assert np.isfinite(features).all()


def test_a_header_that_names_a_column_twice_is_exit_2(spark, lake_dir, tmp_path, capsys):
    csv = write_text(tmp_path / "dup.csv", ["a,a,label", "1,2,0"])
    code, _, err = run(capsys, f"csv:{csv}", "t", lake_dir, "--classes", "2")
    assert code == 2 and "column 'a' twice (columns 1 and 2)" in err and str(csv) in err
    _assert_nothing_written(lake_dir)


def test_csv_split_column_is_used(spark, lake_dir, tmp_path, capsys):
    lines = ["label,f0,f1,split"]
    expected = {}
    for i in range(12):
        split = "test" if i % 3 == 0 else "train"
        lines.append(f"{i % 2},{i}.0,{-(i + 0.5)},{split}")
        expected[(float(i), -(i + 0.5))] = split
    lines.append("1,9.0,9.0,valid")  # not a split we know: rejected, not guessed
    csv = write_text(tmp_path / "split.csv", lines)

    code, out, err = run(capsys, f"csv:{csv}", "s", lake_dir, "--classes", "2")
    assert code == 0, err
    assert summary_of(out)["rejected"] == 1

    df = load(spark, lake_dir, "s")
    assert "split" in df.columns and len(df.columns) == 4
    rows = df.collect()
    assert len(rows) == 12
    assert all(len(r.features) == 2 for r in rows)  # `split` is not a feature
    assert {(r.features[0], r.features[1]): r.split for r in rows} == expected

    reject = load(spark, lake_dir, "s_rejects").collect()
    assert [(r.row_number, r.raw) for r in reject] == [(14, "1,9.0,9.0,valid")]
    assert "split" in reject[0].reason


def test_csv_without_split_column_assigns_train_and_test(spark, lake_dir, tmp_path, capsys):
    n = 200
    lines = ["label,f0,f1"] + [f"{i % 3},{i},{2 * i}" for i in range(n)]
    csv = write_text(tmp_path / "nosplit.csv", lines)

    code, out, err = run(capsys, f"csv:{csv}", "t", lake_dir, "--classes", "3")
    assert code == 0, err
    df = load(spark, lake_dir, "t")
    counts = {r.split: r["count"] for r in df.groupBy("split").count().collect()}
    assert set(counts) == {"train", "test"}
    assert sum(counts.values()) == n
    assert 0.05 * n <= counts["test"] <= 0.4 * n  # DEFAULT_TEST_FRACTION is 0.2
    # every row keeps its own features: nothing duplicated or lost by the split
    assert sorted(r.features[0] for r in df.collect()) == [float(i) for i in range(n)]


def test_csv_with_only_bad_rows_is_exit_2_with_rejects(spark, lake_dir, tmp_path, capsys):
    csv = write_text(tmp_path / "bad.csv", ["label,f0", "9,1.0", "0,abc"])
    code, out, err = run(capsys, f"csv:{csv}", "t", lake_dir, "--classes", "3")
    assert code == 2
    assert str(csv) in err
    assert not (lake_dir / "t" / "_delta_log").exists()
    rejects = load(spark, lake_dir, "t_rejects").collect()
    assert sorted(r.row_number for r in rejects) == [2, 3]


def test_csv_unknown_label_column_is_exit_2(spark, lake_dir, tmp_path, capsys):
    csv = write_text(tmp_path / "d.csv", ["y,f0", "0,1.0"])
    code, out, err = run(capsys, f"csv:{csv}", "t", lake_dir, "--label", "label", "--classes", "2")
    assert code == 2
    assert "label" in err
    _assert_nothing_written(lake_dir)


# --- 4. idempotence and versions -----------------------------------------------------------------

def test_reingest_unchanged_is_skipped_changed_writes_new_version(spark, lake_dir, tmp_path,
                                                                  capsys):
    csv = write_text(tmp_path / "d.csv", ["label,f0,f1", "0,1,2", "1,3,4", "2,5,6"])
    table_dir = lake_dir / "t"

    code, out, err = run(capsys, f"csv:{csv}", "t", lake_dir, "--classes", "3")
    assert code == 0, err
    first = summary_of(out)
    assert first["skipped"] is False and first["version"] == 0 and first["rows"] == 3
    commits = commit_files(table_dir)
    assert history_count(spark, table_dir) == 1

    code, out, err = run(capsys, f"csv:{csv}", "t", lake_dir, "--classes", "3")
    assert code == 0, err
    second = summary_of(out)
    assert second["skipped"] is True
    assert second["version"] == 0
    assert second["rows"] == 3 and second["rejected"] == 0
    assert commit_files(table_dir) == commits
    assert history_count(spark, table_dir) == 1

    write_text(csv, ["label,f0,f1", "2,10,20", "1,30,40"])
    code, out, err = run(capsys, f"csv:{csv}", "t", lake_dir, "--classes", "3")
    assert code == 0, err
    third = summary_of(out)
    assert third["skipped"] is False
    assert third["version"] == 1
    assert third["rows"] == 2
    assert history_count(spark, table_dir) == 2
    assert len(commit_files(table_dir)) == 2

    latest = sorted((r.label, list(r.features)) for r in load(spark, lake_dir, "t").collect())
    assert latest == [(1, [30.0, 40.0]), (2, [10.0, 20.0])]
    v0 = sorted((r.label, list(r.features)) for r in load(spark, lake_dir, "t", 0).collect())
    assert v0 == [(0, [1.0, 2.0]), (1, [3.0, 4.0]), (2, [5.0, 6.0])]


def test_reingest_unchanged_idx_is_skipped(spark, lake_dir, tmp_path, capsys):
    directory, _ = make_idx_dir(tmp_path)
    assert run(capsys, f"idx:{directory}", "t", lake_dir)[0] == 0
    code, out, err = run(capsys, f"idx:{directory}", "t", lake_dir)
    assert code == 0, err
    summary = summary_of(out)
    assert summary["skipped"] is True and summary["version"] == 0 and summary["rows"] == 9
    assert len(commit_files(lake_dir / "t")) == 1


def test_reingest_same_source_with_different_options_is_not_skipped(spark, lake_dir, tmp_path,
                                                                     capsys):
    csv = write_text(tmp_path / "d.csv", ["label,f0", "0,1.0", "5,2.0"])
    code, out, err = run(capsys, f"csv:{csv}", "t", lake_dir, "--classes", "3")
    assert code == 0, err
    assert summary_of(out)["rejected"] == 1  # label 5 is outside 0..2

    code, out, err = run(capsys, f"csv:{csv}", "t", lake_dir, "--classes", "6")
    assert code == 0, err
    summary = summary_of(out)
    assert summary["skipped"] is False
    assert summary["rows"] == 2 and summary["rejected"] == 0
    assert sorted(r.label for r in load(spark, lake_dir, "t").collect()) == [0, 5]


# --- 5. safety -----------------------------------------------------------------------------------

def _foreign_table(spark, path: Path):
    spark.createDataFrame([(1, "keep"), (2, "me")], "k long, v string") \
        .write.format("delta").save(str(path))


def test_foreign_delta_table_is_refused_and_left_unchanged(spark, lake_dir, tmp_path, capsys):
    _foreign_table(spark, lake_dir / "t")
    commits = commit_files(lake_dir / "t")
    csv = write_text(tmp_path / "d.csv", ["label,f0", "0,1.0", "1,2.0"])

    code, out, err = run(capsys, f"csv:{csv}", "t", lake_dir, "--classes", "2")
    assert code == 2, err
    assert str(lake_dir / "t") in err
    assert commit_files(lake_dir / "t") == commits
    assert history_count(spark, lake_dir / "t") == 1
    df = load(spark, lake_dir, "t")
    assert df.columns == ["k", "v"]
    assert sorted(tuple(r) for r in df.collect()) == [(1, "keep"), (2, "me")]


def test_foreign_rejects_table_is_not_overwritten(spark, lake_dir, tmp_path, capsys):
    _foreign_table(spark, lake_dir / "t_rejects")
    commits = commit_files(lake_dir / "t_rejects")
    csv = write_text(tmp_path / "d.csv", ["label,f0", "0,1.0", "5,2.0"])  # one bad row

    code, out, err = run(capsys, f"csv:{csv}", "t", lake_dir, "--classes", "2")
    assert commit_files(lake_dir / "t_rejects") == commits
    assert load(spark, lake_dir, "t_rejects").columns == ["k", "v"]
    assert code == 2, err


# --- 6. parquet ----------------------------------------------------------------------------------

def test_parquet_ingest_with_null_feature_rejected(spark, lake_dir, tmp_path, capsys):
    import pandas as pd

    path = tmp_path / "d.parquet"
    pd.DataFrame({
        "label": [0, 1, 1, 0],
        "a": [0.5, None, 2.5, -1.0],
        "b": [1, 2, 3, 4],
        "ignored": [9.0, 9.0, 9.0, 9.0],
    }).to_parquet(path, index=False)

    code, out, err = run(capsys, f"parquet:{path}", "t", lake_dir, "--label", "label",
                         "--features", "a,b", "--classes", "2")
    assert code == 0, err
    summary = summary_of(out)
    assert summary["rows"] == 3 and summary["rejected"] == 1

    df = load(spark, lake_dir, "t")
    types = dict(df.dtypes)
    assert types["features"] == "array<float>" and types["label"] == "int"
    assert types["id"] == "bigint" and types["split"] == "string"
    got = sorted((r.label, list(r.features)) for r in df.collect())
    assert got == [(0, [-1.0, 4.0]), (0, [0.5, 1.0]), (1, [2.5, 3.0])]
    assert len({r.id for r in df.collect()}) == 3

    rejects = load(spark, lake_dir, "t_rejects").collect()
    assert len(rejects) == 1
    r = rejects[0]
    assert r.source == f"parquet:{path}"
    assert r.row_number == 2
    assert "not a number" in r.reason
    assert json.loads(r.raw)["label"] == 1


def test_parquet_integral_double_labels_are_classes(spark, lake_dir, tmp_path, capsys):
    import pandas as pd

    path = tmp_path / "dbl.parquet"
    pd.DataFrame({"label": [0.0, 1.0, 1.0, 0.5], "a": [1.0, 2.0, 3.0, 4.0]}) \
        .to_parquet(path, index=False)
    code, out, err = run(capsys, f"parquet:{path}", "t", lake_dir, "--features", "a",
                         "--classes", "2")
    assert code == 0, err
    summary = summary_of(out)
    assert summary["rows"] == 3 and summary["rejected"] == 1
    got = sorted((r.features[0], r.label) for r in load(spark, lake_dir, "t").collect())
    assert got == [(1.0, 0), (2.0, 1), (3.0, 1)]
    (reject,) = load(spark, lake_dir, "t_rejects").collect()
    assert reject.row_number == 4 and "integer" in reject.reason


def test_parquet_ragged_feature_arrays_are_rejected_not_a_crash(spark, lake_dir, tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "arr.parquet"
    pq.write_table(pa.table({
        "label": pa.array([0, 1, 1, 0], pa.int64()),
        "features": pa.array([[1.0, 2.0], [3.0], None, [5.0, 6.0]], pa.list_(pa.float64())),
    }), path)
    code, out, err = run(capsys, f"parquet:{path}", "t", lake_dir, "--classes", "2")
    assert code == 0, err
    summary = summary_of(out)
    assert summary["rows"] == 2 and summary["rejected"] == 2
    got = sorted((r.label, list(r.features)) for r in load(spark, lake_dir, "t").collect())
    assert got == [(0, [1.0, 2.0]), (0, [5.0, 6.0])]
    assert sorted(r.row_number for r in load(spark, lake_dir, "t_rejects").collect()) == [2, 3]


# --- 7. bad arguments ----------------------------------------------------------------------------

@pytest.mark.parametrize("source", ["json:{p}", "{p}", "csv:", "csv:{p}/missing.csv",
                                    "idx:{p}/no_such_dir"])
def test_bad_source_is_exit_2(spark, lake_dir, tmp_path, capsys, source):
    csv = write_text(tmp_path / "d.csv", ["label,f0", "0,1.0"])
    text = source.format(p=csv if "missing" not in source and "no_such" not in source
                         else tmp_path)
    code, out, err = run(capsys, text, "t", lake_dir, "--classes", "2")
    assert code == 2
    assert "--source" in err
    _assert_nothing_written(lake_dir)


@pytest.mark.parametrize("extra", [
    ["--classes", "1"],
    ["--classes", "two"],
    ["--table", "bad-name"],
])
def test_bad_arguments_are_exit_2(spark, lake_dir, tmp_path, capsys, extra):
    csv = write_text(tmp_path / "d.csv", ["label,f0", "0,1.0"])
    argv = ["--source", f"csv:{csv}", "--table", "t", "--set", f"lake.path={lake_dir}"]
    capsys.readouterr()
    code = main_wrapper(ingest.main, argv + extra)
    assert code == 2
    assert capsys.readouterr().err.strip()
    assert not any(lake_dir.iterdir())


def test_missing_required_argument_is_exit_2(capsys):
    assert main_wrapper(ingest.main, ["--table", "t"]) == 2
    assert "--source" in capsys.readouterr().err


# --- 5. incremental directories ------------------------------------------------------------------

def test_a_directory_ingests_only_new_files(spark, lake_dir, tmp_path, capsys):
    source = tmp_path / "daily"
    source.mkdir()
    write_text(source / "day1.csv", ["label,f0,f1", "0,1,2", "1,3,4"])
    write_text(source / "day2.csv", ["label,f0,f1", "1,5,6", "x,7,8", "0,9,10"])

    code, out, err = run(capsys, f"csv:{source}", "t", lake_dir, "--classes", "2")
    assert code == 0, err
    first = summary_of(out)
    assert (first["files"], first["rows"], first["rejected"], first["version"]) == (2, 4, 1, 0)
    rows = {r.id: (r.label, list(r.features)) for r in load(spark, lake_dir, "t").collect()}
    # ids continue across files: day2.csv's line 4 comes after day1.csv's 3 lines
    assert len(rows) == 4 and rows[3 + 4 - 1] == (0, [9.0, 10.0])
    rejects = load(spark, lake_dir, "t_rejects").collect()
    assert [(r.source.endswith("day2.csv"), r.row_number, r.raw) for r in rejects] == [(True, 3, "x,7,8")]

    code, out, err = run(capsys, f"csv:{source}", "t", lake_dir, "--classes", "2")
    again = summary_of(out)
    assert code == 0 and again["skipped"] is True and again["version"] == 0
    assert load(spark, lake_dir, "t").count() == 4

    write_text(source / "day3.csv", ["label,f0,f1", "1,11,12"])
    code, out, err = run(capsys, f"csv:{source}", "t", lake_dir, "--classes", "2")
    third = summary_of(out)
    assert code == 0 and (third["files"], third["rows"], third["version"]) == (1, 1, 1)
    ids = sorted(r.id for r in load(spark, lake_dir, "t").collect())
    assert ids == [1, 2, 4, 6, 8] and load(spark, lake_dir, "t_rejects").count() == 1

    write_text(source / "day1.csv", ["label,f0,f1", "0,1,2"])
    code, _, err = run(capsys, f"csv:{source}", "t", lake_dir, "--classes", "2")
    assert code == 2 and "['day1.csv'] changed since they were ingested" in err
    assert load(spark, lake_dir, "t").count() == 5


def test_a_directory_table_survives_foreign_commits_and_refuses_a_single_file_and_a_second_ingest(
        spark, lake_dir, tmp_path, capsys):
    """An OPTIMIZE (a commit fedspark did not write) neither stops the next ingest nor loses the
    list of files ingested; a single file would replace the directory's table, so it is refused;
    while one ingest of a table runs (holding its lock), a second stops with exit 2."""
    import fcntl

    source = tmp_path / "daily"
    source.mkdir()
    write_text(source / "day1.csv", ["label,f0,f1", "0,1,2", "1,3,4"])
    code, _, err = run(capsys, f"csv:{source}", "t", lake_dir, "--classes", "2")
    assert code == 0, err
    spark.sql(f"OPTIMIZE delta.`{lake_dir / 't'}`").collect()
    write_text(source / "day2.csv", ["label,f0,f1", "1,5,6"])
    code, out, err = run(capsys, f"csv:{source}", "t", lake_dir, "--classes", "2")
    assert code == 0, err
    assert (summary_of(out)["files"], summary_of(out)["rows"]) == (1, 1)
    assert load(spark, lake_dir, "t").count() == 3

    single = write_text(tmp_path / "one.csv", ["label,f0,f1", "0,7,8"])
    code, _, err = run(capsys, f"csv:{single}", "t", lake_dir, "--classes", "2")
    assert code == 2 and "was ingested from a directory" in err
    assert load(spark, lake_dir, "t").count() == 3

    write_text(source / "day3.csv", ["label,f0,f1", "0,9,10"])
    (lake_dir / ".locks").mkdir(exist_ok=True)
    with open(lake_dir / ".locks" / "table-t.lock", "a+") as held:   # another ingest of t runs
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        code, _, err = run(capsys, f"csv:{source}", "t", lake_dir, "--classes", "2")
    assert code == 2 and "table 't' is in use" in err
    assert load(spark, lake_dir, "t").count() == 3


# --- 6. LibSVM -----------------------------------------------------------------------------------

LIBSVM_LINES = [            # (line, reason fragment or None)
    ("# a comment line", None),
    ("1 3:0.5 7:-1.25 20:3", None),
    ("-1 1:2 2:1e-3  # trailing comment", None),
    ("", None),
    ("+1 5:1", None),
    ("0", None),                                  # a row with no non-zeros
    ("1 3:0.5 3:1", "ascending"),
    ("1 0:1", "outside 1..20"),
    ("1 21:1", "outside 1..20"),
    ("1 4:abc", "pair 1 '4:abc'"),
    ("1 4", "not index:value"),
    ("2 4:1", "outside the declared classes"),
    ("1 2:nan", "NaN"),
]


def test_libsvm_ingest_matches_scikit_learn_and_rejects_bad_pairs(spark, lake_dir, tmp_path, capsys):
    from sklearn.datasets import load_svmlight_file

    text = write_text(tmp_path / "data.svm", [line for line, _ in LIBSVM_LINES])
    code, out, err = run(capsys, f"libsvm:{text}", "s", lake_dir, "--classes", "2",
                         "--num-features", "20")
    assert code == 0, err
    bad = {n: why for n, (_, why) in enumerate(LIBSVM_LINES, start=1) if why}
    good_lines = [n for n, (line, why) in enumerate(LIBSVM_LINES, start=1)
                  if not why and line and not line.startswith("#")]
    summary = summary_of(out)
    assert (summary["rows"], summary["rejected"]) == (len(good_lines), len(bad))

    df = load(spark, lake_dir, "s")
    assert dict(df.dtypes)["features"] == "struct<size:int,indices:array<int>,values:array<float>>"
    rows = sorted(df.collect(), key=lambda r: r.id)
    assert [r.id for r in rows] == [n - 1 for n in good_lines]
    reference = tmp_path / "good.svm"
    write_text(reference, [LIBSVM_LINES[n - 1][0] for n in good_lines])
    X, y = load_svmlight_file(str(reference), n_features=20, zero_based=False)
    for r, x_ref, y_ref in zip(rows, X, y, strict=False):
        assert r.features.size == 20
        assert r.features.indices == list(x_ref.indices)
        assert np.allclose(r.features.values, x_ref.data, rtol=1e-7)
        assert r.label == (1 if y_ref > 0 else 0)

    by_line = {r.row_number: r.reason for r in load(spark, lake_dir, "s_rejects").collect()}
    assert sorted(by_line) == sorted(bad)
    for n, why in bad.items():
        assert why in by_line[n], (n, by_line[n])


def test_libsvm_width_defaults_to_the_largest_index_and_a_directory_needs_it(spark, lake_dir,
                                                                             tmp_path, capsys):
    text = write_text(tmp_path / "d.svm", ["1 2:1 9:2", "0 4:1"])
    code, out, err = run(capsys, f"libsvm:{text}", "w", lake_dir)
    assert code == 0, err
    assert {r.features.size for r in load(spark, lake_dir, "w").collect()} == {9}
    directory = tmp_path / "daily"
    directory.mkdir()
    write_text(directory / "a.svm", ["1 2:1"])
    code, _, err = run(capsys, f"libsvm:{directory}", "wd", lake_dir)
    assert code == 2 and "--num-features" in err
    assert not (lake_dir / "wd").exists()


def test_a_libsvm_table_trains_sparse_and_matches_the_dense_table(spark, lake_dir, tmp_path, capsys):
    """The same rows as LibSVM (sparse) and as CSV (dense) train to the same weights."""
    from pipelines import train

    rng = np.random.default_rng(5)
    X = np.where(rng.random((400, 30)) < 0.2, rng.integers(1, 5, (400, 30)), 0).astype(float)
    y = (X[:, :5].sum(axis=1) > X[:, 5:10].sum(axis=1)).astype(int)
    # a comment first line, so every row has the line number (and so the id and split) of its CSV row
    pairs = [" ".join(f"{j + 1}:{v:g}" for j, v in enumerate(row) if v) for row in X]
    write_text(tmp_path / "t.svm", ["# label index:value ..."]
               + [f"{label} {row}" for row, label in zip(pairs, y, strict=True)])
    write_text(tmp_path / "t.csv", ["label," + ",".join(f"f{j}" for j in range(30))] +
               [f"{label}," + ",".join(f"{v:g}" for v in row) for row, label in zip(X, y, strict=False)])
    for source, table in ((f"libsvm:{tmp_path / 't.svm'}", "sp"), (f"csv:{tmp_path / 't.csv'}", "de")):
        extra = ("--num-features", "30") if table == "sp" else ()
        code, _, err = run(capsys, source, table, lake_dir, "--classes", "2", *extra)
        assert code == 0, err
    got = {}
    for table in ("sp", "de"):
        capsys.readouterr()
        code = main_wrapper(train.main, [
            "--set", f"lake.path={lake_dir}", "--set", f"runs.path={tmp_path / 'runs'}",
            "--set", f"data.table={table}", "--set", "model.kind=logistic",
            "--set", "trainer.strategy=sync", "--set", "trainer.epochs=2",
            "--set", "trainer.batch_size=64", "--set", "trainer.dtype=float64",
            "--set", "data.partitions=2", "--run-name", table])
        out = capsys.readouterr()
        assert code == 0, out.err
        summary = json.loads(out.out.strip().splitlines()[-1])
        with np.load(Path(summary["model_path"]) / "weights.npz") as z:
            got[table] = z["theta"]
    assert np.allclose(got["sp"], got["de"], atol=1e-10)
