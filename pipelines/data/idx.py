"""IDX files (the MNIST / Fashion-MNIST format), gzipped or not, read with strict checks.

Format: a 4-byte magic number (0x00 0x00, a type code, the number of dimensions), one big-endian
uint32 size per dimension, then the data. Images are uint8 with 3 dimensions, labels uint8 with 1.
"""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from pipelines.core.errors import UserError

UBYTE = 0x08
SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


class IdxError(UserError):
    pass


def find(directory: Path, stem: str) -> Path:
    for candidate in (directory / f"{stem}.gz", directory / stem):
        if candidate.is_file():
            return candidate
    raise IdxError(f"{directory}: missing IDX file {stem}.gz (or {stem})")


def read(path: Path, ndim: int) -> np.ndarray:
    """The array stored in an IDX file; an error names the file and what is wrong with it."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError) as exc:
        raise IdxError(f"{path}: cannot read: {exc}") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise IdxError(f"{path}: not an IDX file (magic number {raw[:4].hex() or 'missing'}, "
                       f"expected 0000{UBYTE:02x}{ndim:02x})")
    if raw[2] != UBYTE or raw[3] != ndim:
        raise IdxError(f"{path}: magic number {raw[:4].hex()}: expected unsigned bytes "
                       f"(type 08) with {ndim} dimension(s) (0000{UBYTE:02x}{ndim:02x})")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise IdxError(f"{path}: truncated header ({len(raw)} bytes)")
    shape = tuple(int(s) for s in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(shape))
    got = len(raw) - header
    if got != expected:
        what = "truncated" if got < expected else "has trailing bytes"
        raise IdxError(f"{path}: {what}: header says shape {shape} ({expected} bytes of data), "
                       f"file holds {got}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def read_split(directory: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images flattened to [n, rows*cols] uint8 and labels [n] for one split."""
    images_file, labels_file = (find(directory, stem) for stem in SPLIT_FILES[split])
    images = read(images_file, 3)
    labels = read(labels_file, 1)
    if len(images) != len(labels):
        raise IdxError(f"{images_file} holds {len(images)} images but {labels_file} holds "
                       f"{len(labels)} labels")
    return images.reshape(len(images), -1), labels
