"""Checkpoints written by training: every N steps and the final step, when a signal stops the run,
and atomically (complete or absent)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from gpt.errors import NonFiniteError
from gpt.train.rundir import atomic_write
from gpt.train.signals import validates_after_step


class PeriodicCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint, which also saves (its top-k file and last.ckpt) after the final
    step, and saves a step that is validated after that validation
    (docs/design.md, "Periodic checkpoints")."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._after_validation: tuple[Any, Any, int] | None = None

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if validates_after_step(trainer):
            self._after_validation = (outputs, batch, batch_idx)
        else:
            self._save_step(trainer, pl_module, outputs, batch, batch_idx)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if self._after_validation is not None and not trainer.sanity_checking:
            args, self._after_validation = self._after_validation, None
            self._save_step(trainer, pl_module, *args)

    def _save_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if 0 < trainer.max_steps <= trainer.global_step:
            self.save_now(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.save_now(trainer)
        super().on_train_end(trainer, pl_module)

    def save_now(self, trainer: L.Trainer) -> None:
        """Save as a periodic save would, unless this step is saved already (or Lightning would not
        save now: sanity check, fast_dev_run, not fitting)."""
        if self._should_skip_saving_checkpoint(trainer):
            return
        candidates = self._monitor_candidates(trainer)
        self._save_topk_checkpoint(trainer, candidates)
        self._save_last_checkpoint(trainer, candidates)


class CheckpointOnException(L.Callback):
    """Save <dirpath>/on_exception.ckpt when training is stopped by a signal (Ctrl-C, SIGTERM: see
    gpt.train.signals); remove it when a later run of the same dir finishes normally.

    Only then: Lightning raises SIGTERMException where an optimizer step and its validation have
    ended, and a checkpoint saved there resumes exactly. Any other exception (a crash, an
    out-of-memory error, a second Ctrl-C) can come from the middle of a step, and a checkpoint of
    that half-taken step would not resume exactly; the run continues from its newest periodic
    checkpoint instead. Lightning's OnExceptionCheckpoint saves on every exception, and its
    presence also makes Trainer.fit treat ckpt_path=None as "last"; train.py chooses what to
    resume from itself.
    """

    def __init__(self, dirpath: str, filename: str = "on_exception") -> None:
        self.path = Path(dirpath) / f"{filename}.ckpt"

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        if not isinstance(exception, SIGTERMException):
            return
        try:
            trainer.save_checkpoint(self.path, weights_only=False)
        except (OSError, NonFiniteError) as e:  # a full disk, say: let the first error be reported
            rank_zero_warn(f"could not save {self.path}: {e}")

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Lightning calls teardown only when fit ends normally, not after an exception.
        trainer.strategy.remove_checkpoint(self.path)


def saved_step(path: str) -> int | None:
    """The optimizer step a checkpoint was saved at (its tensors are mapped, not read), or None for
    a checkpoint that is not one file (a sharded directory)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)["global_step"]
    except (OSError, RuntimeError, KeyError):
        return None


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, with the temporary file beside the checkpoint.

    Lightning's own save goes through an fsspec transaction, which for local paths writes the
    temporary file into the system temp dir and moves it into place. When that is another
    filesystem than the run dir (a node-local /tmp and a shared run dir, as on most clusters), the
    move is a copy, and a kill during it leaves a truncated checkpoint under its final name. Here
    the rename is always within one directory, and so atomic. Remote URLs keep Lightning's path.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_write(Path(path), lambda f: torch.save(checkpoint, f))
