"""Blocks built straight from a table's files equal the shuffled build's, and the block cache
(data.block_cache) reuses them across loads: not rebuilt when nothing changed, rebuilt when its
files were altered or the table was recreated, kept under its cap, and never holding a secret."""
from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest

from pipelines.core.config import config_from_dict
from pipelines.data import lake
from pipelines.data.blocks import blocks_from_rows, load_blocks, read_rows
from pipelines.data.direct import BlockCache
from pipelines.federated.clients import prepare_clients
from tests.conftest import write_table
from udfs.data import blocks, store


def _table(spark, lake_dir: Path, name: str, seed: int, n: int = 600) -> np.ndarray:
    """A training table with ids spread over the long range (the shard hash matters); its ids."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 5)).astype(np.float32)
    y = rng.integers(0, 3, n)
    split = np.where(rng.random(n) < 0.25, "test", "train")
    ids = rng.choice(np.arange(-10**12, 10**12, 7_919), size=n, replace=False)   # hashed, not 0..n
    write_table(spark, lake_dir, name, X, y, split, ids.astype(np.int64))
    return np.sort(ids)


def _arrays(got) -> dict[int, tuple[np.ndarray, ...]]:
    """Each block's arrays, read back from the executor's disk (local mode: the same machine)."""
    out: dict[int, tuple[np.ndarray, ...]] = {}
    for h in got.handles.collect():
        b = blocks._open(h.path)
        out[h.part] = (np.asarray(b.X), b.y, b.id, b.shard, b.test)
    return out


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        all(np.array_equal(x, y) for x, y in zip(a[k], b[k], strict=True)) for k in a)


def _features_inode(got, part: int = 0) -> int:
    path = next(h.path for h in got.handles.collect() if h.part == part)
    return os.stat(os.path.join(path, "X.bin")).st_ino


@pytest.fixture(scope="module")
def tables(spark, tmp_path_factory):
    path = tmp_path_factory.mktemp("lake")
    _table(spark, path, "t", seed=1)
    return path


def _load(spark, lake_dir, cache: BlockCache, name: str = "t", partitions: int = 3):
    return load_blocks(spark, str(lake_dir), lake.TableRef(name), partitions, 0, 0.2,
                       block_cache=cache)


def test_blocks_from_files_equal_the_shuffled_build(spark, tables):
    direct = _load(spark, tables, BlockCache(None, 0.0))
    rows, version = read_rows(spark, str(tables), lake.TableRef("t"))
    shuffled = blocks_from_rows(spark, rows, "t", version, 3, 0, 0.2)
    try:
        assert _same(_arrays(direct), _arrays(shuffled))
        assert direct.layout == shuffled.layout and direct.test_rows == shuffled.test_rows
    finally:
        direct.release()
        shuffled.release()


def test_a_second_load_reuses_the_cached_blocks_and_an_altered_file_is_rebuilt(spark, tables,
                                                                              tmp_path):
    cache = BlockCache(str(tmp_path / "cache"), 1.0)
    first = _load(spark, tables, cache)
    expected, inode = _arrays(first), _features_inode(first)
    first.release()
    again = _load(spark, tables, cache)
    try:   # the same file (a hard link to the cached one), not a rebuilt copy
        assert _features_inode(again) == inode and _same(_arrays(again), expected)
    finally:
        again.release()
    (cached,) = (tmp_path / "cache").glob("*/part-00000/X.bin")
    with open(cached, "r+b") as fh:   # flip some bytes in place: same size, new mtime
        fh.write(b"\x00" * 64)
    rebuilt = _load(spark, tables, cache)
    try:
        assert _features_inode(rebuilt) != inode and _same(_arrays(rebuilt), expected)
    finally:
        rebuilt.release()


def test_a_table_recreated_under_the_same_name_is_not_served_from_the_cache(spark, tmp_path):
    lake_dir, cache = tmp_path / "lake", BlockCache(str(tmp_path / "cache"), 1.0)
    lake_dir.mkdir()
    written = []
    for seed in (2, 3):   # the second: version 0 again, of another Delta table
        shutil.rmtree(lake_dir / "r", ignore_errors=True)
        written.append(_table(spark, lake_dir, "r", seed=seed))
        got = _load(spark, lake_dir, cache, "r")
        try:
            assert np.array_equal(np.sort(np.concatenate([a[2] for a in _arrays(got).values()])),
                                  written[-1])
        finally:
            got.release()
    assert len(list((tmp_path / "cache").iterdir())) == 3   # two keys and the lock


def test_the_cache_holds_no_secret_and_only_the_users_files(spark, tables, tmp_path):
    root = tmp_path / "cache"
    got = _load(spark, tables, BlockCache(str(root), 1.0))
    try:
        app_dirs = [Path(h.path) for h in got.handles.collect()]
        assert all((d / blocks.SECRET_FILE).is_file() for d in app_dirs)
        assert len({(d / blocks.SECRET_FILE).read_bytes() for d in app_dirs}) == len(app_dirs)
        for where, _, files in os.walk(root):
            assert stat.S_IMODE(os.stat(where).st_mode) == 0o700, where
            assert blocks.SECRET_FILE not in files and blocks.META_FILE not in files
            for name in files:
                assert stat.S_IMODE(os.stat(os.path.join(where, name)).st_mode) == 0o600, name
    finally:
        got.release()


def _entry(src: Path, size: int) -> list[str]:
    src.mkdir(parents=True, exist_ok=True)
    (src / "X.bin").write_bytes(b"x" * size)
    return ["X.bin"]


def test_eviction_keeps_the_store_under_its_cap_least_recently_used_first(tmp_path):
    shop = store.Store(str(tmp_path / "store"), cap_bytes=2500)
    names = _entry(tmp_path / "src", 1000)
    for key in ("a", "b"):
        shop.put(str(tmp_path / "src"), names, key, 0)
    dest = tmp_path / "taken"
    dest.mkdir()
    assert shop.take("a", 0, str(dest))        # "a" is now the more recently used
    shop.put(str(tmp_path / "src"), names, "c", 0)
    assert [shop.has(k, 0) for k in ("a", "b", "c")] == [True, False, True]
    held = sum(f.stat().st_size for f in (tmp_path / "store").rglob("X.bin"))
    assert held <= 2500
    shop.put(str(tmp_path / "big"), _entry(tmp_path / "big", 3000), "d", 0)   # larger than the cap
    assert not shop.has("d", 0) and (dest / "X.bin").is_file()


def test_client_blocks_are_reused_and_keyed_by_the_partitioner(spark, tables, tmp_path):
    def prepared(seed: int):
        config = config_from_dict({
            "lake": {"path": str(tables)}, "data": {"table": "t", "block_cache": str(tmp_path),
                                                    "block_cache_gb": 1.0},
            "trainer": {"strategy": "federated", "seed": seed},
            "federated": {"clients": 5, "partitioner": "dirichlet", "alpha": 0.5}})
        return prepare_clients(spark, config)

    runs = []
    for seed in (0, 0, 1):
        clients, test = prepared(seed)
        runs.append((_arrays(clients), _features_inode(clients), clients.sizes))
        clients.release()
        if test is not None:
            test.release()
    (a, inode_a, sizes_a), (b, inode_b, sizes_b), (c, inode_c, sizes_c) = runs
    assert inode_a == inode_b and _same(a, b) and np.array_equal(sizes_a, sizes_b)
    assert inode_c != inode_a and not np.array_equal(sizes_a, sizes_c)
