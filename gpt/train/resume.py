"""What a (re)started training resumes from, and the command that resumes it."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import sys
from pathlib import Path

from gpt.errors import UserError
from gpt.runs.checkpoint import RESUME_ANOTHER, newest_checkpoint, read_checkpoint


def resolve_resume(ckpt_path: str | None, run_dir: str | Path) -> str | None:
    """What trainer.fit resumes from.

    None: the run dir's newest readable checkpoint if it has one (running the same command again on
    the same run dir continues it), else a fresh start; unreadable ones (a partial or corrupt file)
    are skipped with a warning. "last": the same, but one must exist. Anything else: that file.
    """
    if ckpt_path in (None, "last"):
        path = newest_checkpoint(run_dir, warn=True)
        if path is not None:
            return str(path)
        if ckpt_path == "last":
            raise UserError(
                f"ckpt_path=last but {run_dir}/checkpoints/ holds no readable checkpoint; drop ckpt_path"
            )
        return None
    ckpt_path = os.path.expanduser(ckpt_path)
    if not Path(ckpt_path).is_file():
        raise UserError(f"ckpt_path {ckpt_path} does not exist; pass a .ckpt file, 'last', or nothing")
    read_checkpoint(Path(ckpt_path), mmap=True, fix=RESUME_ANOTHER)  # refuses what cannot be resumed
    return ckpt_path


def python_command() -> str:
    """`python` when that is this interpreter on PATH (an activated venv), else its full path."""
    found = shutil.which("python")
    return "python" if found and os.path.samefile(found, sys.executable) else sys.executable


def resume_command(argv: list[str], run_dir: str | Path, job_overrides: list[str] | None = None) -> str:
    """The shell command that continues a stopped run: the one that started it (`argv`), with
    hydra.run.dir=<run dir> added when it was not given, since the default runs/<date>/<time>
    would name a new folder. For one job of a sweep (-m), the job's own overrides replace the
    sweep's arguments: it resumes that job alone."""
    script, *args = argv
    if job_overrides is not None:
        args = list(job_overrides)
    if not any(re.match(r"\+{0,2}hydra\.run\.dir=", a) for a in args):
        relative = os.path.relpath(run_dir)
        path = str(run_dir) if relative.startswith("..") else relative
        if not re.fullmatch(r"[\w./:-]+", path):  # spaces and the like: quoted for Hydra too
            path = f'"{path}"'
        args.append(f"hydra.run.dir={path}")
    return shlex.join([python_command(), script, *args])
