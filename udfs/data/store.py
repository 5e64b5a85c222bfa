"""The block store on an executor's local disk: built blocks kept by key, so a later load of the
same table version with the same partitioning (a later run, another application) takes them
instead of reading and building the table again (`data.block_cache`).

An entry is one block's data files (features, per-row columns, block.json) plus a manifest of
their sizes and modification times. A load never uses the entry's files in place: it hard-links
them into the application's own block directory (udfs/data/blocks.py), beside that application's
own meta.json and secret.key, so nothing secret is ever in the store, and an entry evicted or
replaced later does not pull the data from under a running job (its links keep the files). Before
an entry is trusted, each file's size and mtime must match its manifest: a file altered or
truncated since it was stored makes the entry a miss (it is deleted and the block built again).

Directories are 0700 and files 0600: the blocks are the table's rows, readable only by the job's
user. The store holds at most `cap_bytes`; storing an entry first evicts the least recently used
ones (each entry's `used` stamp is touched when a load takes it). Every change and every take holds
one lock file per store, so two Python workers (or two applications) on the host never see an
entry half-stored or half-evicted.

With the cache off the store lives in the application's own directory (per application, removed
with its blocks): the same code then only hands blocks from the job that builds several of them at
once to the tasks that own them.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

MANIFEST = "manifest.json"
USED = "used"
LOCK = ".lock"
DEFAULT_ROOT = os.path.join("fedspark", "blocks")   # under the user's cache dir (XDG)


def default_root() -> str:
    """$XDG_CACHE_HOME/fedspark/blocks, or ~/.cache/fedspark/blocks: resolved on the executor,
    whose user and home may not be the driver's."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, DEFAULT_ROOT)


@dataclass(frozen=True)
class Store:
    """Where entries live (`root`) and how many bytes they may take (None: no cap)."""

    root: str
    cap_bytes: int | None

    def entry(self, key: str, part: int) -> str:
        return os.path.join(self.root, key, f"part-{part:05d}")

    @contextmanager
    def _locked(self) -> Iterator[None]:
        os.makedirs(self.root, mode=0o700, exist_ok=True)
        fd = os.open(os.path.join(self.root, LOCK), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def take(self, key: str, part: int, dest: str) -> bool:
        """Link the entry's files into the directory `dest`; False (and the entry deleted) when
        there is none or its files no longer match the manifest."""
        path = self.entry(key, part)
        if not os.path.isdir(path):
            return False
        with self._locked():
            names = _verified(path)
            if names is None:
                shutil.rmtree(path, ignore_errors=True)
                return False
            for name in names:
                _link(os.path.join(path, name), os.path.join(dest, name))
            os.utime(os.path.join(path, USED))
        return True

    def has(self, key: str, part: int) -> bool:
        """Whether a trusted entry is here (checked as take does, without taking it)."""
        path = self.entry(key, part)
        return os.path.isdir(path) and _verified(path) is not None

    def put(self, src: str, names: list[str], key: str, part: int) -> None:
        """Store the files `names` of the block directory `src` (linked, not copied, when the store
        is on the same file system) as the entry (key, part), evicting least recently used entries
        to stay under the cap; an entry larger than the cap alone is not stored."""
        size = sum(os.path.getsize(os.path.join(src, n)) for n in names)
        if self.cap_bytes is not None and size > self.cap_bytes:
            return
        path = self.entry(key, part)
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        os.mkdir(tmp, 0o700)
        try:
            for name in names:
                _link(os.path.join(src, name), os.path.join(tmp, name))
                os.chmod(os.path.join(tmp, name), 0o600)
            manifest = {n: _stamp(os.path.join(tmp, n)) for n in names}
            for name, data in ((MANIFEST, json.dumps(manifest).encode()), (USED, b"")):
                fd = os.open(os.path.join(tmp, name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as fh:
                    fh.write(data)
            with self._locked():
                if self.cap_bytes is not None:
                    self._evict(self.cap_bytes - size)
                shutil.rmtree(path, ignore_errors=True)
                os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
                os.replace(tmp, path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _evict(self, budget: int) -> None:
        """Delete least recently used entries until the others take at most `budget` bytes."""
        entries = sorted(self._entries(), key=lambda e: e[0])
        total = sum(size for _, size, _ in entries)
        for _, size, path in entries:
            if total <= budget:
                break
            shutil.rmtree(path, ignore_errors=True)
            total -= size
            parent = os.path.dirname(path)
            if not os.listdir(parent):
                os.rmdir(parent)

    def _entries(self) -> list[tuple[int, int, str]]:
        """(last use in ns, bytes, path) of every complete entry."""
        found = []
        for key in os.listdir(self.root):
            key_dir = os.path.join(self.root, key)
            if key.startswith(".") or not os.path.isdir(key_dir):
                continue
            for part in os.listdir(key_dir):
                path = os.path.join(key_dir, part)
                if ".tmp-" in part:
                    continue   # being stored
                try:
                    with open(os.path.join(path, MANIFEST)) as fh:
                        manifest = json.load(fh)
                    used = os.stat(os.path.join(path, USED)).st_mtime_ns
                except (OSError, ValueError):
                    continue   # half removed by a crash: not counted, and never taken
                found.append((used, sum(size for size, _ in manifest.values()), path))
        return found

    def remove(self, key: str) -> None:
        """Delete every entry of `key` (an application-local store, when its blocks are released)."""
        shutil.rmtree(os.path.join(self.root, key), ignore_errors=True)


def _stamp(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


def _verified(path: str) -> list[str] | None:
    """The entry's file names if every one still has the size and mtime of its manifest."""
    try:
        with open(os.path.join(path, MANIFEST)) as fh:
            manifest = json.load(fh)
        if all(tuple(_stamp(os.path.join(path, n))) == tuple(s) for n, s in manifest.items()):
            return sorted(manifest)
    except (OSError, ValueError):
        pass
    return None


def _link(src: str, dst: str) -> None:
    """A hard link, or a copy when `dst` is on another file system."""
    try:
        os.link(src, dst)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        shutil.copy2(src, dst)
