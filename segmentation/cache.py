"""A least-recently-used cache bounded by the bytes of what it holds."""

from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict
from collections.abc import Hashable, Iterator
from typing import Any


class ByteLRU:
    """Maps keys to values with a known size; evicts the least recently used beyond `max_bytes`.

    A value larger than `max_bytes` on its own is not stored. Thread-safe: every method takes the
    cache's own lock, so a background thread may `put` while another thread reads or records.
    """

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self.nbytes = 0
        self._entries: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()
        self._journals: list[list[tuple[Hashable, Any, int]]] = []
        self._lock = threading.RLock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._entries

    def get(self, key: Hashable) -> Any | None:
        """The value, marked as most recently used; None when absent."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            self._entries.move_to_end(key)
            return entry[0]

    def put(self, key: Hashable, value: Any, nbytes: int) -> None:
        """Store `value`, counted as `nbytes`, then evict least recently used entries to fit."""
        with self._lock:
            for journal in self._journals:
                journal.append((key, value, nbytes))
            self.pop(key)
            if nbytes > self.max_bytes:
                return
            self._entries[key] = (value, nbytes)
            self.nbytes += nbytes
            while self.nbytes > self.max_bytes:
                _, (_, evicted) = self._entries.popitem(last=False)
                self.nbytes -= evicted

    @contextlib.contextmanager
    def recording(self) -> Iterator[list[tuple[Hashable, Any, int]]]:
        """A list of every (key, value, nbytes) `put` meanwhile, by any thread, for example to
        copy what a forked process computed into its parent's cache."""
        journal: list[tuple[Hashable, Any, int]] = []
        with self._lock:
            self._journals.append(journal)
        try:
            yield journal
        finally:
            with self._lock:
                self._journals.remove(journal)

    def pop(self, key: Hashable) -> Any | None:
        with self._lock:
            entry = self._entries.pop(key, None)
            if entry is None:
                return None
            self.nbytes -= entry[1]
            return entry[0]
