"""Where a server writes the files of its answers (annotated images, COCO JSON, ZIPs), and how
they go away again.

Each process writes into its own folder, `<parent>/grounded-sam-exports/process-<pid>/run-*`:
- run folders older than `max_age_s` are removed by a timer every `prune_every_s` (not only when
  another export is written, so an idle server's disk empties too);
- the process's folder is removed when the process exits normally, which includes Ctrl-C and,
  when the app turns it into one (app.py), SIGTERM;
- at start-up, the folders of processes that no longer run (killed, crashed) are removed, and so
  are run folders from versions that wrote straight into `grounded-sam-exports`.
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)

_PROCESS_FOLDER = re.compile(r"process-(\d+)")


class ExportFolders:
    """Fresh folders for each answer's files, under one folder that this process owns.

    Args:
        parent: where `grounded-sam-exports` goes (the app uses Gradio's upload folder, so that
            Gradio serves the files without copying them).
        max_age_s: run folders older than this are removed.
        prune_every_s: how often the timer looks for them.
    """

    def __init__(
        self, parent: str | os.PathLike, *, max_age_s: float = 3600, prune_every_s: float = 60
    ) -> None:
        self.root = Path(parent) / "grounded-sam-exports"
        self.folder = self.root / f"process-{os.getpid()}"
        self.max_age_s = max_age_s
        self.prune_every_s = prune_every_s
        self._stop = threading.Event()
        self._timer: threading.Thread | None = None
        self._lock = threading.Lock()

    def start(self) -> ExportFolders:
        """Create this process's folder, remove those of dead processes, start the timer and
        register the removal at exit. Idempotent."""
        with self._lock:
            if self._timer is not None:
                return self
            self.folder.mkdir(parents=True, exist_ok=True)
            self._remove_stale()
            self._timer = threading.Thread(
                target=self._prune_periodically, daemon=True, name="grounded-sam-export-pruning"
            )
            self._timer.start()
            atexit.register(self.close)
        return self

    def new_run(self) -> Path:
        """A new, empty folder for one answer's files (starts the folders on first use)."""
        self.start()
        self.folder.mkdir(parents=True, exist_ok=True)  # in case something removed it
        return Path(tempfile.mkdtemp(prefix="run-", dir=self.folder))

    def prune(self) -> int:
        """Remove this process's run folders older than `max_age_s`; returns how many."""
        cutoff = time.time() - self.max_age_s
        removed = 0
        for run in self.folder.glob("run-*"):
            try:
                if run.stat().st_mtime < cutoff:
                    shutil.rmtree(run, ignore_errors=True)
                    removed += 1
            except FileNotFoundError:
                pass
        return removed

    def close(self) -> None:
        """Stop the timer and remove this process's folder with everything in it."""
        self._stop.set()
        shutil.rmtree(self.folder, ignore_errors=True)

    def _prune_periodically(self) -> None:
        while not self._stop.wait(self.prune_every_s):
            try:
                self.prune()
            except OSError:  # never take the server down over housekeeping
                log.exception("pruning %s failed", self.folder)

    def _remove_stale(self) -> None:
        """Folders of processes that are gone, and run folders of the older flat layout."""
        for entry in self.root.iterdir():
            match = _PROCESS_FOLDER.fullmatch(entry.name)
            stale = (
                entry.name.startswith("run-")
                if match is None
                else not _process_alive(int(match.group(1)))
            )
            if stale and entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True
