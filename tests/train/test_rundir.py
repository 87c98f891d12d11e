"""What guards a run dir: the lock (one training at a time; a failed start leaves no folder
behind), atomic writes and the cleanup of interrupted ones, the free-space check, the config record."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections import namedtuple
from pathlib import Path

import pytest
import torch

from gpt.errors import UserError
from gpt.train import rundir
from gpt.train.rundir import (
    LOCK_NAME,
    RunLock,
    atomic_write,
    check_free_space,
    checkpoint_bytes,
    is_launch_rank_zero,
    remove_partial_writes,
    same_file,
    save_run_config,
)
from tests.helpers import tiny_model


def test_run_lock_refuses_a_second_holder_and_is_released(tmp_path):
    busy = pytest.raises(UserError, match=r"another training \(pid \d+ on .*\) is running in")
    with RunLock(tmp_path), busy, RunLock(tmp_path):
        pass
    with RunLock(tmp_path):  # released on exit
        pass


def test_a_failed_start_removes_the_run_dir_it_made_and_nothing_else(tmp_path):
    def start(run: Path, fail: bool = True, write: str | None = None) -> None:
        with (
            pytest.raises(UserError) if fail else contextlib.nullcontext(),
            RunLock(run, cleanup_below=tmp_path),
        ):
            if write:
                (run / write).mkdir()
            if fail:
                raise UserError("bad input")

    (tmp_path / "runs" / "earlier").mkdir(parents=True)
    for day in ("today", "tomorrow"):  # as Hydra leaves it: the run dir and an empty log
        (tmp_path / "runs" / day / "12-00-00").mkdir(parents=True)
        (tmp_path / "runs" / day / "12-00-00" / "train.log").write_text("")
    start(tmp_path / "runs" / "today" / "12-00-00")
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["earlier", "tomorrow"]
    (tmp_path / "runs" / "earlier").rmdir()
    start(tmp_path / "runs" / "tomorrow" / "12-00-00")
    assert list(tmp_path.iterdir()) == []  # runs/ too: the walk stops at cleanup_below

    kept = {
        "succeeded": dict(fail=False),
        "wrote-more": dict(write="checkpoints"),  # failed after writing something: not only ours
        "older-file": dict(),  # a file older than this process: a run dir that existed before
    }
    for name in kept:
        (tmp_path / name).mkdir()
        (tmp_path / name / "train.log").write_text("")
    os.utime(tmp_path / "older-file" / "train.log", (0, 0))
    for name, how in kept.items():
        start(tmp_path / name, **how)
        assert (tmp_path / name / "train.log").is_file() and (tmp_path / name / LOCK_NAME).is_file(), name
    with (
        pytest.raises(UserError),
        RunLock(tmp_path / "busy"),
        RunLock(tmp_path / "busy", cleanup_below=tmp_path),
    ):
        pass  # refused: the folder is another training's
    assert (tmp_path / "busy" / LOCK_NAME).is_file()


def test_run_lock_locks_the_file_that_is_there(tmp_path):
    """A failed start deletes train.lock while holding it; a start that opened it meanwhile must
    not run on the deleted file beside a third one that locks a new train.lock."""
    with open(tmp_path / LOCK_NAME, "a+") as f:
        assert same_file(f, tmp_path / LOCK_NAME)
        (tmp_path / LOCK_NAME).unlink()
        assert not same_file(f, tmp_path / LOCK_NAME)


def test_only_rank_zero_takes_the_lock(monkeypatch):
    for name in ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert is_launch_rank_zero()
    for name in ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK"):
        monkeypatch.setenv(name, "1")
        assert not is_launch_rank_zero()
        monkeypatch.setenv(name, "0")
    assert is_launch_rank_zero()


def test_free_space_check(tmp_path, monkeypatch):
    check_free_space(tmp_path / "checkpoints", 1000, "checkpoints")  # not made yet: its parent's disk
    free = shutil.disk_usage(tmp_path).free
    with pytest.raises(UserError, match=r"MB free but 5 checkpoints need about .* MB; free some space"):
        check_free_space(tmp_path / "checkpoints", free * 2, "5 checkpoints")


def test_free_space_message_names_the_folder_and_both_sizes(tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(0, 0, 1_500_000))
    check_free_space(tmp_path / "a" / "b", 1_500_000, "x")  # exactly enough
    with pytest.raises(UserError) as info:
        check_free_space(tmp_path / "a" / "b", 2_500_000, "6 checkpoints")
    assert str(info.value) == (
        f"{tmp_path} has 1.5 MB free but 6 checkpoints need about 2.5 MB; "
        "free some space or choose another hydra.run.dir"
    )


def test_atomic_write_replaces_the_file_whole_or_not_at_all(tmp_path):
    target = tmp_path / "sub" / "file.bin"
    atomic_write(target, lambda f: f.write(b"first"))
    assert target.read_bytes() == b"first"
    atomic_write(target, lambda f: f.write(b"second"))
    assert target.read_bytes() == b"second"

    def dies_half_way(f):
        f.write(b"half of a th")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        atomic_write(target, dies_half_way)
    assert target.read_bytes() == b"second"  # the old file, and no temporary file beside it
    assert [p.name for p in target.parent.iterdir()] == ["file.bin"]


def test_remove_partial_writes_deletes_only_interrupted_temporary_files(tmp_path):
    keep = [tmp_path / "checkpoints" / "last.ckpt", tmp_path / ".hydra" / "config.yaml", tmp_path / "a.tmp-1"]
    stale = [tmp_path / "checkpoints" / ".step-20.ckpt.tmp-4242", tmp_path / ".hydra" / ".config.yaml.tmp-7"]
    for p in keep + stale:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")
    assert sorted(remove_partial_writes(tmp_path)) == sorted(stale)
    assert [p for p in keep + stale if p.exists()] == keep
    assert remove_partial_writes(tmp_path) == []


def test_save_run_config_writes_each_file_under_dot_hydra(tmp_path):
    save_run_config(tmp_path, {"config.yaml": "seed: 1\n", "overrides.yaml": "- model=nano\n"})
    assert sorted(p.name for p in (tmp_path / ".hydra").iterdir()) == ["config.yaml", "overrides.yaml"]
    assert (tmp_path / ".hydra" / "config.yaml").read_text() == "seed: 1\n"
    save_run_config(tmp_path, {"config.yaml": "seed: 2 # é\n"})  # replaced, as UTF-8
    assert (tmp_path / ".hydra" / "config.yaml").read_bytes() == "seed: 2 # é\n".encode()


def test_checkpoint_bytes_counts_weights_and_two_optimizer_moments():
    model = tiny_model()
    n = sum(p.numel() for p in model.parameters())
    assert checkpoint_bytes(model) == 3 * 4 * n + sum(b.numel() * b.element_size() for b in model.buffers())
    assert checkpoint_bytes(model.to(torch.bfloat16)) == 3 * 2 * n + sum(
        b.numel() * b.element_size() for b in model.buffers()
    )


def test_new_files_are_a_folder_of_files_written_since_this_process_started(tmp_path):
    assert rundir.new_files(tmp_path) == set()
    (tmp_path / "train.log").write_text("")
    assert rundir.new_files(tmp_path) == {"train.log"}
    (tmp_path / "sub").mkdir()
    assert rundir.new_files(tmp_path) is None  # a folder in it: not a run dir Hydra just made
    (tmp_path / "sub").rmdir()
    os.utime(tmp_path / "train.log", (0, 0))
    assert rundir.new_files(tmp_path) is None  # older than this process
