"""Files and directories that appear whole or not at all.

A reader (a resumed run, another job, a retried Spark task racing a dead one) must never see half a
file: every writer here writes under a hidden temporary name beside the final one (the same
directory, so the same file system, where a rename is atomic) and renames it into place only once
the content is complete. Both the driver's run directories and the executors' blocks and cells
write this way, so the helpers live on the executor side (udfs never imports pipelines).
"""
from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO


def _temporary(path: str | Path) -> str:
    """The hidden name a writer uses beside `path`; the pid keeps two processes (a retried task and
    the one it replaces) from writing into each other's file."""
    head, name = os.path.split(os.fspath(path))
    return os.path.join(head, f".{name}.tmp-{os.getpid()}")


@contextmanager
def replacing(path: str | Path, private: bool = False) -> Iterator[BinaryIO]:
    """A binary file to write that replaces `path` when the block ends without an error: flushed
    and fsynced before the rename, so after a crash `path` holds the old or the new bytes, never a
    torn mix. On an error the temporary file is removed and `path` is left as it was. `private`:
    mode 0600 from its creation (a secret is never readable by others, not even for a moment)."""
    tmp = _temporary(path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o666)
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_dir(os.path.dirname(os.fspath(path)) or ".")
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _fsync_dir(directory: str) -> None:
    """Make a rename in `directory` durable (the new name survives a power loss)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, private: bool = False) -> None:
    """`data` as the whole content of `path` (see replacing)."""
    with replacing(path, private) as fh:
        fh.write(data)


def create_once(path: str, data: bytes) -> bytes:
    """The content of `path`: `data` when this call creates it, else what the call that created it
    wrote (a retried task reads its first attempt's). Private (0600) and whole or absent: written
    under a temporary name, then hard-linked into place, which fails when `path` exists."""
    tmp = _temporary(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, path)
            return data
        except FileExistsError:
            with open(path, "rb") as existing:
                return existing.read()
    finally:
        os.remove(tmp)


@contextmanager
def replacing_dir(path: str) -> Iterator[str]:
    """A fresh temporary directory to fill that replaces the directory `path` when the block ends
    without an error; on an error (or when the block leaves it empty on purpose: nothing to store)
    it is removed and `path` is left as it was. Not fsynced: directories are the executors'
    blocks and cells, scratch data on local disk that is rebuilt when missing, where flushing
    gigabytes would only slow the build; the rename still keeps a racing task from seeing a
    half-written one."""
    tmp = _temporary(path)
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not os.listdir(tmp):
        os.rmdir(tmp)
        return
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)
