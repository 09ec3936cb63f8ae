"""Mask geometry shared by the cache, the drawing and the exports."""

from __future__ import annotations

import numpy as np


def true_window(mask: np.ndarray) -> tuple[slice, slice] | None:
    """(rows, columns) of the smallest window holding every True pixel of a (H, W) bool `mask`,
    or None when it has none."""
    rows, columns = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if len(rows) == 0:
        return None
    return slice(int(rows[0]), int(rows[-1]) + 1), slice(int(columns[0]), int(columns[-1]) + 1)
