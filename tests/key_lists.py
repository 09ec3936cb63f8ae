"""The shipped test data and the one parser of the official checkpoint key lists in tests/data.

Each list has `#` comment lines, then one line per state-dict entry: key, shape (a Python tuple),
dtype and P (parameter) or B (buffer), tab-separated.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch

DATA_DIR = Path(__file__).parent / "data"
VOCAB_FILE = DATA_DIR / "bert-base-uncased-vocab.txt"
SWINT_OGC_KEYS = "gdino_swint_ogc_keys.txt"
SWINB_KEYS = "gdino_swinb_keys.txt"


class KeyEntry(NamedTuple):
    key: str
    shape: tuple[int, ...]
    dtype: str
    kind: str


def read_key_list(name: str, prefix: str = "") -> list[KeyEntry]:
    """The entries of the key list `name` (a file in tests/data) whose key starts with `prefix`."""
    entries = []
    for line in (DATA_DIR / name).read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        key, shape, dtype, kind = line.split("\t")
        if key.startswith(prefix):
            dims = tuple(int(d) for d in shape.strip("()").split(",") if d.strip())
            entries.append(KeyEntry(key, dims, dtype, kind))
    return entries


def key_shapes(name: str, prefix: str = "") -> dict[str, tuple[int, ...]]:
    """{key: shape} of the key list `name`, for keys starting with `prefix`."""
    return {entry.key: entry.shape for entry in read_key_list(name, prefix)}


def constant_state_dict(entries: list[KeyEntry]) -> dict[str, torch.Tensor]:
    """One distinct constant per key (its index), expanded to the key's shape and dtype.

    Nothing full-size is allocated (every tensor is a stride-0 view of one element, and
    `torch.save` writes that one element), yet after a load each value says which key it came from.
    """
    return {
        entry.key: torch.tensor(index, dtype=getattr(torch, entry.dtype)).expand(entry.shape)
        for index, entry in enumerate(entries)
    }
