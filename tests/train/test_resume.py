"""What a (re)started training resumes from, and the command printed to resume it."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
import torch

from gpt.errors import UserError
from gpt.train.resume import python_command, resolve_resume, resume_command


def test_resolve_resume(tmp_path, monkeypatch):
    assert resolve_resume(None, tmp_path) is None
    with pytest.raises(UserError, match="ckpt_path=last but"):
        resolve_resume("last", tmp_path)
    with pytest.raises(UserError, match="does not exist"):
        resolve_resume(str(tmp_path / "nope.ckpt"), tmp_path)
    (tmp_path / "checkpoints").mkdir()
    torch.save({"global_step": 10}, tmp_path / "checkpoints" / "step-10.ckpt")
    time.sleep(0.01)
    torch.save({"global_step": 20}, tmp_path / "checkpoints" / "last.ckpt")
    assert resolve_resume(None, tmp_path).endswith("last.ckpt")
    assert resolve_resume("last", tmp_path).endswith("last.ckpt")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve_resume("~/checkpoints/step-10.ckpt", "elsewhere") == str(
        tmp_path / "checkpoints" / "step-10.ckpt"
    )
    # a newer but truncated file (a kill mid-write outside Lightning's atomic save) is skipped
    good = (tmp_path / "checkpoints" / "last.ckpt").read_bytes()
    time.sleep(0.01)
    (tmp_path / "checkpoints" / "step-30.ckpt").write_bytes(good[: len(good) // 2])
    with pytest.warns(UserWarning, match="skipping unreadable checkpoint .*step-30.ckpt"):
        assert resolve_resume(None, tmp_path).endswith("last.ckpt")
    # a checkpoint carrying a pickled object is refused
    time.sleep(0.01)
    torch.save({"payload": Path("x")}, tmp_path / "checkpoints" / "evil.ckpt")
    with pytest.raises(UserError, match="evil.ckpt is not a checkpoint \\(it holds Python objects"):
        resolve_resume(str(tmp_path / "checkpoints" / "evil.ckpt"), tmp_path)


def test_resume_command_names_the_run_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    py = python_command()
    typed = ["train.py", "model=small", 'prompt="a b"']
    assert (
        resume_command(typed, tmp_path / "runs/d/t")
        == f"""{py} train.py model=small 'prompt="a b"' hydra.run.dir=runs/d/t"""
    )
    given = ["train.py", "hydra.run.dir=runs/mine"]
    assert resume_command(given, tmp_path / "runs/mine") == f"{py} train.py hydra.run.dir=runs/mine"
    assert resume_command(["train.py"], "/else where") == f"""{py} train.py 'hydra.run.dir="/else where"'"""
    # one job of a sweep: that job's overrides, without -m
    sweep = ["train.py", "-m", "optim.lr=1e-3,3e-3"]
    assert resume_command(sweep, tmp_path / "runs/multirun/d/t/1", ["optim.lr=3e-3"]) == (
        f"{py} train.py optim.lr=3e-3 hydra.run.dir=runs/multirun/d/t/1"
    )


def test_python_command_is_python_only_when_that_is_this_interpreter(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no python on PATH
    assert python_command() == sys.executable
    (tmp_path / "python").symlink_to(sys.executable)
    assert python_command() == "python"
    (tmp_path / "python").unlink()
    (tmp_path / "python").write_text("#!/bin/sh\n")  # another python
    (tmp_path / "python").chmod(0o755)
    assert python_command() == sys.executable
