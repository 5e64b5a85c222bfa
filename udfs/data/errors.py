"""The error a training-table row raises when it cannot become part of a block, shared by the
block writer (udfs/data/blocks.py) and the feature transform it applies (udfs/data/transform.py)."""
from __future__ import annotations


class BlockError(ValueError):
    """A row of the training table cannot become part of a block (named by its id)."""
