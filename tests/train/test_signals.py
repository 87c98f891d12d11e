"""StopOnSignal in a Trainer in this process: a signal in the middle of a step or of a validation
stops training where both have ended, with Lightning's counters as after a whole step; a second
Ctrl-C stops at once. tests/commands/test_faults.py runs train.py and resumes."""

from __future__ import annotations

import os
import signal

import lightning as L
import pytest
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.utilities.exceptions import SIGTERMException

from gpt.train.signals import CTRL_C, SIGTERM, StopOnSignal
from tests.helpers import bare_trainer


class SignalAt(L.Callback):
    """Sends this process `signum` (`times` times) from inside optimizer step `step` (0-based: in
    its backward pass), or with where="val" from the validation after `step` steps."""

    def __init__(self, signum: int, step: int, where: str = "train", times: int = 1) -> None:
        self.signum, self.step, self.where, self.times = signum, step, where, times
        self.sent = False
        self.val_batches: list[int] = []

    def _send(self, trainer: L.Trainer, where: str) -> None:
        if where == self.where and trainer.global_step == self.step and not self.sent:
            self.sent = True
            for _ in range(self.times):
                os.kill(os.getpid(), self.signum)

    def on_before_backward(self, trainer: L.Trainer, *args: object) -> None:
        self._send(trainer, "train")

    def on_validation_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        self.val_batches.append(trainer.global_step)
        self._send(trainer, "val")


class LoggedBoring(BoringModel):
    def validation_step(self, batch, batch_idx):
        loss = super().validation_step(batch, batch_idx)["x"]
        self.log("val/loss", loss)


def trainer_with(tmp_path, sender: SignalAt, stop: StopOnSignal, **kwargs) -> L.Trainer:
    # StopOnSignal is a Checkpoint callback, which Lightning refuses beside enable_checkpointing=False.
    return bare_trainer(tmp_path, callbacks=[sender, stop], enable_checkpointing=True, **kwargs)


def validating_trainer(tmp_path, sender: SignalAt, stop: StopOnSignal) -> L.Trainer:
    """10 steps, validating (3 batches) every 4."""
    return trainer_with(
        tmp_path, sender, stop, max_steps=10, val_check_interval=4, check_val_every_n_epoch=None,
        limit_val_batches=3, num_sanity_val_steps=0,
    )  # fmt: skip


def assert_whole_steps(trainer: L.Trainer, steps: int) -> None:
    """Lightning's batch counters agree with the optimizer steps, as after a step that ended (a
    checkpoint of a step cut short had total.ready one ahead: every later validation came early)."""
    progress = trainer.fit_loop.epoch_loop.batch_progress
    assert trainer.global_step == steps
    assert progress.total.ready == progress.total.completed == steps


def test_ctrl_c_in_a_step_stops_after_that_step(tmp_path):
    sender, stop = SignalAt(signal.SIGINT, step=2), StopOnSignal()
    trainer = validating_trainer(tmp_path, sender, stop)
    with pytest.raises(SIGTERMException):
        trainer.fit(LoggedBoring())
    assert stop.stopped_by == CTRL_C and not stop.aborted
    assert_whole_steps(trainer, 3)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handed back


def test_sigterm_in_validation_stops_once_it_has_ended(tmp_path):
    sender, stop = SignalAt(signal.SIGTERM, step=4, where="val"), StopOnSignal()
    trainer = validating_trainer(tmp_path, sender, stop)
    with pytest.raises(SIGTERMException):
        trainer.fit(LoggedBoring())
    assert stop.stopped_by == SIGTERM
    assert sender.val_batches == [4, 4, 4]  # the whole validation, not the first batch of it
    assert "val/loss" in trainer.callback_metrics
    assert_whole_steps(trainer, 4)


def test_a_second_ctrl_c_stops_at_once(tmp_path):
    sender, stop = SignalAt(signal.SIGINT, step=2, times=2), StopOnSignal()
    trainer = trainer_with(tmp_path, sender, stop, max_steps=10, limit_val_batches=0)
    with pytest.raises(SystemExit) as stopped:  # Lightning's answer to a KeyboardInterrupt
        trainer.fit(LoggedBoring())
    assert isinstance(stopped.value.__context__, KeyboardInterrupt)
    assert stop.aborted and trainer.global_step == 2  # step 3 was cut short


def test_a_signal_in_the_last_step_lets_training_finish(tmp_path):
    sender, stop = SignalAt(signal.SIGTERM, step=5), StopOnSignal()
    trainer = trainer_with(tmp_path, sender, stop, max_steps=6, limit_val_batches=0)
    trainer.fit(LoggedBoring())  # no exception: the run is complete
    assert trainer.global_step == 6 and sender.sent
