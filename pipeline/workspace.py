"""The output folder of a command: all of its files appear together, or none do.

A command writes into ``OUT/.partial-<pid>/``; only when it succeeds are the files moved into
``OUT`` (each by an atomic rename, ``report.json`` last, so a report never names a file that is
not there yet).  A failure — bad input, a full disk, Ctrl-C — removes the partial folder and leaves
whatever an earlier run put in ``OUT`` untouched.  ``OUT/.resume/`` keeps the fine-tuning state
of an interrupted run (``--resume`` continues from it) and is removed when a run succeeds.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path
from types import TracebackType
from typing import Any

PARTIAL_PREFIX = ".partial-"
RESUME_DIR = ".resume"
STORAGE_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EEXIST)
LAST = ("report.json",)


class OutputError(OSError):
    """The output folder cannot be written; the message names the folder and the fix."""


def storage_error(error: OSError, out: Path) -> OutputError:
    """A one-line :class:`OutputError` for an ``OSError`` met while writing into ``out``."""
    reason = os.strerror(error.errno) if error.errno else str(error)
    fix = "free some space or choose another --out" if error.errno in (errno.ENOSPC, errno.EDQUOT) else \
        "choose a writable folder with --out"
    return OutputError(error.errno, f"cannot write the output folder {out} ({reason}): {fix}; "
                                    "earlier files there are untouched")


class OutputFolder:
    """``with OutputFolder(out) as work:`` — write into ``work``; see the module docstring."""

    def __init__(self, out: str | Path) -> None:
        self.out = Path(out)
        self.work = self.out / f"{PARTIAL_PREFIX}{os.getpid()}"
        self.resume = self.out / RESUME_DIR

    def __enter__(self) -> Path:
        self.created = not self.out.exists()
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            for stale in self.out.glob(f"{PARTIAL_PREFIX}*"):  # left by a killed run
                shutil.rmtree(stale, ignore_errors=True)
            self.work.mkdir()
        except OSError as error:
            raise storage_error(error, self.out) from error
        return self.work

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        if error is None:
            try:
                self._commit()
            except OSError as failure:
                shutil.rmtree(self.work, ignore_errors=True)
                raise storage_error(failure, self.out) from failure
            return
        shutil.rmtree(self.work, ignore_errors=True)
        if self.created and not any(self.out.iterdir()):  # made for this command: gone with it
            self.out.rmdir()
        if isinstance(error, OSError) and not isinstance(error, OutputError) and error.errno in STORAGE_ERRORS:
            raise storage_error(error, self.out) from error

    def resume_checkpoint(self, settings: dict[str, Any] | None, resume: bool) -> Path | None:
        """The fine-tuning checkpoint of this run, ``OUT/.resume/train-state.pt`` (None for a run
        that does not fine-tune: ``settings`` None).

        ``resume``: continue from it — it must exist and have been written with the same
        ``settings`` (the recipe sections that shape the fine-tuning).  Otherwise any old state
        is removed and the run starts from scratch."""
        checkpoint, recorded = self.resume / "train-state.pt", self.resume / "settings.json"
        if settings is None:
            if resume:
                raise ValueError("--resume: this command does not fine-tune, so there is nothing to resume: "
                                 "run it without --resume")
            return None
        if resume:
            if not checkpoint.exists() or not recorded.exists():
                raise FileNotFoundError(f"--resume: no interrupted run in {self.out} (no {RESUME_DIR}/train-state.pt):"
                                        " run without --resume")
            before = json.loads(recorded.read_text())
            changed = sorted(key for key in set(before) | set(settings) if before.get(key) != settings.get(key))
            if changed:
                raise ValueError(f"--resume: the interrupted run in {self.out} used other settings "
                                 f"({', '.join(changed)}): repeat its options, or run without --resume")
            return checkpoint
        try:
            shutil.rmtree(self.resume, ignore_errors=True)
            self.resume.mkdir(parents=True)
            recorded.write_text(json.dumps(settings, sort_keys=True, default=str))
        except OSError as error:
            raise storage_error(error, self.out) from error
        return checkpoint

    def final(self, path: str | Path) -> Path:
        """Where a file written at ``path`` inside the partial folder ends up."""
        return self.out / Path(path).relative_to(self.work)

    def relocate(self, value: Any) -> Any:
        """``value`` (a report: dicts, lists, strings) with partial-folder paths turned into final ones."""
        if isinstance(value, dict):
            return {key: self.relocate(item) for key, item in value.items()}
        if isinstance(value, list):
            return [self.relocate(item) for item in value]
        if isinstance(value, (str, Path)) and str(value).startswith(str(self.work)):
            return str(self.final(value))
        return value

    def _commit(self) -> None:
        entries = sorted(self.work.iterdir(), key=lambda p: p.name in LAST)
        for entry in entries:
            target = self.out / entry.name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            os.replace(entry, target)
        self.work.rmdir()
        shutil.rmtree(self.resume, ignore_errors=True)
