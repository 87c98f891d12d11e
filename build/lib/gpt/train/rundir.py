"""What guards a run dir: one training at a time, room for its checkpoints before it starts,
checkpoint files that are either complete or absent, a config record written only once the
config has validated, and no empty run dir left behind by a start that failed."""

from __future__ import annotations

import os
import shutil
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, BinaryIO

import torch

from gpt.errors import UserError

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; runs are not guarded against each other there
    fcntl = None

LOCK_NAME = "train.lock"
# Ranks other than global zero find these set by the launcher (Lightning's own subprocess
# launcher sets LOCAL_RANK and NODE_RANK; torchrun sets RANK; srun sets SLURM_PROCID).
RANK_VARIABLES = ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK")


def is_launch_rank_zero() -> bool:
    """Whether this process is (or will become) global rank zero, read from the launcher's
    environment: the decision is needed before Lightning has set up any process group."""
    return all(os.environ.get(name, "0") == "0" for name in RANK_VARIABLES)


def atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Call write(f) on a temporary file beside `path`, flush it to disk, then rename it over
    `path`: a reader (or a resume after a kill) sees the old file or the new one, never part of one.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# When this process started, near enough: train.py imports this module before Hydra makes the run
# dir. A file modified since then was written by this start (or by one running beside it).
STARTED = time.time()


class RunLock:
    """An exclusive lock on <run dir>/train.lock for as long as a training runs in that dir.

    flock() locks belong to the open file, so the kernel drops the lock when the process ends in
    any way, SIGKILL included: a killed run never leaves a stale lock behind. The file holds the
    owner's host, pid and start time, to name it to a second run that is refused.

    With `cleanup_below` (the folder the run dir's path is relative to), a start that fails leaves
    no new folder behind: if the run dir held nothing but files written since this process started
    (the log Hydra opened) and still holds nothing else but the lock, those files, the run dir and
    the parents it leaves empty below `cleanup_below` are removed. A run dir that held anything
    older, a checkpoint or a config record is never touched.
    """

    def __init__(self, run_dir: str | Path, cleanup_below: str | Path | None = None) -> None:
        self.path = Path(os.path.abspath(run_dir)) / LOCK_NAME
        self._file = None
        self._cleanup_below = Path(os.path.abspath(cleanup_below)) if cleanup_below is not None else None
        self._new_files = new_files(self.path.parent) if cleanup_below is not None else None

    def __enter__(self) -> RunLock:
        if fcntl is None:
            return self
        while True:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            f = open(self.path, "a+")
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                owner = f.read().strip() or "another process"
                f.close()
                raise UserError(
                    f"another training ({owner}) is running in {self.path.parent}; wait for it to end, "
                    "stop it, or choose another hydra.run.dir"
                ) from None
            if same_file(f, self.path):
                break
            f.close()  # a failed start removed the file after we opened it: lock the new one
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}")
        f.flush()
        self._file = f
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        failed_start = exc_type is not None and self._holds_only_new_files()
        try:
            if failed_start:  # while holding the lock; __enter__ of a start waiting on it looks again
                for name in {*self._new_files, LOCK_NAME}:
                    (self.path.parent / name).unlink(missing_ok=True)
        except OSError:  # Windows refuses to delete the open log: leave the folder
            failed_start = False
        finally:
            if self._file is not None:
                self._file.close()  # releases the lock; the file stays unless the start failed
                self._file = None
        if failed_start:
            remove_empty_dirs(self.path.parent, self._cleanup_below)

    def _holds_only_new_files(self) -> bool:
        if self._new_files is None:
            return False
        allowed = {*self._new_files, LOCK_NAME}
        try:
            return all(p.name in allowed and p.is_file() for p in self.path.parent.iterdir())
        except OSError:
            return False


def new_files(directory: Path) -> set[str] | None:
    """The names in `directory` if it holds only files written since this process started (a run
    dir that Hydra made for this start holds only its log file), else None."""
    try:
        entries = list(directory.iterdir())
        if all(p.is_file() and not p.is_symlink() and p.stat().st_mtime >= STARTED for p in entries):
            return {p.name for p in entries}
    except OSError:
        pass
    return None


def same_file(f: IO, path: Path) -> bool:
    """Whether the open file `f` is still the file at `path` (not deleted or replaced)."""
    try:
        return os.fstat(f.fileno()).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def remove_empty_dirs(directory: Path, below: Path) -> None:
    """Remove `directory` if empty, then each parent that this leaves empty, strictly below `below`."""
    for d in (directory, *directory.parents):
        if d != directory and (d == below or below not in d.parents):
            return
        try:
            d.rmdir()
        except OSError:  # not empty: someone else's runs are in it
            return


def remove_partial_writes(run_dir: str | Path) -> list[Path]:
    """Delete the temporary files of checkpoint writes that a kill interrupted. Call it only while
    holding the run's lock: otherwise they may belong to a training that is still writing."""
    stale = [p for p in Path(run_dir).glob("**/.*.tmp-*") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def checkpoint_bytes(module: torch.nn.Module) -> int:
    """About how large one training checkpoint of `module` is: its parameters and buffers, plus
    two optimizer states per parameter (AdamW's moments; Muon keeps fewer)."""
    params = sum(p.numel() * p.element_size() for p in module.parameters())
    buffers = sum(b.numel() * b.element_size() for b in module.buffers())
    return 3 * params + buffers


def check_free_space(directory: str | Path, needed: int, what: str) -> None:
    """Refuse to start when `directory` has less room than `needed` bytes."""
    directory = Path(directory)
    while not directory.exists():  # the checkpoint dir is made on the first save
        directory = directory.parent
    free = shutil.disk_usage(directory).free
    if free < needed:
        raise UserError(
            f"{directory} has {free / 1e6:,.1f} MB free but {what} need about {needed / 1e6:,.1f} MB; "
            "free some space or choose another hydra.run.dir"
        )


def save_run_config(run_dir: str | Path, files: dict[str, str]) -> None:
    """Write <run dir>/.hydra/<name> for each name -> YAML text, each file atomically."""
    for name, text in files.items():
        atomic_write(Path(run_dir, ".hydra", name), lambda f, text=text: f.write(text.encode("utf-8")))
