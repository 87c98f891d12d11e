"""Checkpoints written by training: the final step saved (PeriodicCheckpoint), on_exception.ckpt
(CheckpointOnException, on a stop only), and atomic writes beside the target (AtomicCheckpointIO)."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.utilities.exceptions import SIGTERMException

from gpt.errors import NonFiniteError
from gpt.train.checkpointing import AtomicCheckpointIO, CheckpointOnException, PeriodicCheckpoint, saved_step


class EndAtStep5(L.Callback):
    """Ends training after step 5 of 10: normally (as early stopping would) or by an exception."""

    def __init__(self, fail: bool) -> None:
        self.fail = fail

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.global_step == 5:
            if self.fail:
                raise RuntimeError("injected")
            trainer.should_stop = True


@pytest.mark.parametrize("fail", [False, True], ids=["stopped", "failed"])
def test_last_checkpoint_is_the_final_step_only_of_a_normal_end(tmp_path, fail):
    checkpoint = PeriodicCheckpoint(
        dirpath=tmp_path, filename="step-{step}", monitor="step", mode="max", save_top_k=2,
        save_last=True, every_n_train_steps=4, auto_insert_metric_name=False,
    )  # fmt: skip
    trainer = L.Trainer(
        max_steps=10, callbacks=[EndAtStep5(fail), checkpoint], limit_val_batches=0, logger=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    if fail:
        with pytest.raises(RuntimeError, match="injected"):
            trainer.fit(BoringModel())
    else:
        trainer.fit(BoringModel())
    step = 4 if fail else 5  # an exception leaves the last periodic save as it was
    assert {p.name for p in tmp_path.iterdir()} == {"last.ckpt", "step-4.ckpt", f"step-{step}.ckpt"}
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["global_step"] == step


def test_checkpoints_are_written_beside_their_target_and_renamed(tmp_path, monkeypatch):
    seen = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (seen.append((Path(a), Path(b))), real_replace(a, b)))
    AtomicCheckpointIO().save_checkpoint({"w": torch.ones(3)}, tmp_path / "ck" / "last.ckpt")
    ((tmp_name, target),) = seen
    assert tmp_name.parent == target.parent == tmp_path / "ck" and tmp_name.name.startswith(".last.ckpt.tmp-")
    assert torch.load(target, weights_only=True)["w"].tolist() == [1, 1, 1]
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["last.ckpt"]


def saving_trainer(saved: list[Path], fails: Exception | None = None) -> SimpleNamespace:
    def save_checkpoint(path, weights_only=None):
        assert weights_only is False  # everything a resume needs (and no line about it)
        if fails:
            raise fails
        torch.save({"global_step": 3}, path)
        saved.append(Path(path))

    remove = lambda path: Path(path).unlink(missing_ok=True)  # noqa: E731
    return SimpleNamespace(
        save_checkpoint=save_checkpoint, strategy=SimpleNamespace(remove_checkpoint=remove)
    )


def test_on_exception_checkpoint_is_saved_on_a_stop_then_removed_by_a_finished_run(tmp_path):
    saved: list[Path] = []
    callback = CheckpointOnException(str(tmp_path))
    callback.on_exception(saving_trainer(saved), None, SIGTERMException())
    assert saved == [tmp_path / "on_exception.ckpt"] and saved_step(str(saved[0])) == 3
    callback.teardown(saving_trainer(saved), None, "fit")  # a later run of the same dir finishes
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("error", [KeyboardInterrupt(), RuntimeError("x"), NonFiniteError("nan")])
def test_no_on_exception_checkpoint_of_a_step_cut_short(tmp_path, error):
    """A second Ctrl-C, a crash or a NaN can come in the middle of a step: the run continues from
    its newest periodic checkpoint instead."""
    saved: list[Path] = []
    CheckpointOnException(str(tmp_path)).on_exception(saving_trainer(saved), None, error)
    assert saved == [] and list(tmp_path.iterdir()) == []


def test_a_failed_on_exception_save_only_warns(tmp_path):
    callback = CheckpointOnException(str(tmp_path))
    with pytest.warns(UserWarning, match=r"could not save .*on_exception.ckpt: \[Errno 28\] disk full"):
        callback.on_exception(saving_trainer([], OSError(28, "disk full")), None, SIGTERMException())
    assert list(tmp_path.iterdir()) == []


def testsaved_step_reads_the_step_or_none(tmp_path):
    torch.save({"global_step": 42, "state_dict": {"w": torch.ones(2)}}, tmp_path / "a.ckpt")
    assert saved_step(str(tmp_path / "a.ckpt")) == 42
    (tmp_path / "sharded.ckpt").mkdir()  # a sharded checkpoint is a folder
    assert saved_step(str(tmp_path / "sharded.ckpt")) is None
    torch.save({"state_dict": {}}, tmp_path / "b.ckpt")
    assert saved_step(str(tmp_path / "b.ckpt")) is None
