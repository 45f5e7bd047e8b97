"""A log of finished benchmark runs by key, so that an interrupted benchmark resumes.

Benchmarks that take hours on two cores (:mod:`bench.accuracy`, :mod:`bench.taylor`) compute
each run through :meth:`RunLog.run`: a run whose key is in the log is not run again, and a
finished run is written at once (to a temporary name, then renamed), so a benchmark stopped at
any point and started again with ``--resume`` loses at most the run it was in.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import time
from pathlib import Path

PENDING = {"pending": True}
"""What a worker's :meth:`RunLog.run` returns for a run another worker is busy with."""


class RunLog:
    """Finished runs by key (``experiment/setting/seed``), kept in a JSON file rewritten (to a
    temporary name, then renamed) after every run; with no path, in memory only.

    Several processes may share one file (``python -m bench.accuracy --jobs N``): the file is
    re-read and merged under an exclusive ``flock`` before each write, and with ``shared=True`` a
    run is claimed by an ``flock`` on ``<log>.claims/<sha1 of key>`` for as long as it runs, so
    two workers never run the same key; a worker skips a claimed key (returns :data:`PENDING`).
    A claim dies with its process, so a killed worker leaves nothing stale behind."""

    def __init__(self, path: Path | None = None, shared: bool = False) -> None:
        if shared and path is None:
            raise ValueError("a shared RunLog needs a path")
        self.path = path
        self.shared = shared
        self.runs: dict[str, dict] = {}
        self._reload()

    def _reload(self) -> None:
        if self.path is not None and self.path.exists():
            self.runs.update(json.loads(self.path.read_text()))

    @contextlib.contextmanager
    def _locked(self, lock: Path, blocking: bool = True):
        """Yields whether the exclusive ``flock`` on ``lock`` was taken (always, when blocking)."""
        lock.parent.mkdir(parents=True, exist_ok=True)
        with open(lock, "a") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            except BlockingIOError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def run(self, key: str, compute) -> dict:
        """The logged result of ``key``, or ``compute()`` timed (``"seconds"`` of wall clock,
        ``"cpu_seconds"`` of this process's CPU time: unlike wall clock, not inflated by a paused
        or shared machine), logged and returned."""
        self._reload()
        if key in self.runs:
            print(f"  {key}: logged earlier, not run again", flush=True)
            return self.runs[key]
        if not self.shared:
            return self._compute(key, compute)
        claim = self.path.with_name(self.path.name + ".claims") / hashlib.sha1(key.encode()).hexdigest()
        with self._locked(claim, blocking=False) as claimed:
            if not claimed:
                print(f"  {key}: another worker is running it", flush=True)
                return PENDING
            self._reload()  # it may have finished between the first look and the claim
            return self.runs[key] if key in self.runs else self._compute(key, compute)

    def _compute(self, key: str, compute) -> dict:
        started, cpu_started = time.time(), time.process_time()
        result = {**compute(), "seconds": round(time.time() - started, 1),
                  "cpu_seconds": round(time.process_time() - cpu_started, 1)}
        self.runs[key] = result
        if self.path is None:
            return result
        with self._locked(self.path.with_name(self.path.name + ".lock")):
            self._reload()
            self.runs[key] = result
            tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(self.runs, indent=1, default=float) + "\n")
            tmp.replace(self.path)
        return result
