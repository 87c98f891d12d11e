"""Ctrl-C, SIGTERM and SLURM's requeue signal act at the end of an optimizer step (after its
validation), never inside one: a handler only records the signal, `StopOnSignal` acts on it
(why: docs/design.md, "Signals act between steps")."""

from __future__ import annotations

import os
import signal
import sys
import threading
from types import FrameType
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

CTRL_C = "Ctrl-C"
SIGTERM = "SIGTERM"


def validates_after_step(trainer: L.Trainer) -> bool:
    """Whether the batch that just ended (in on_train_batch_end) is followed by validation.

    Lightning decides it in its training epoch loop, after on_train_batch_end, from the same
    counters; asking the loop itself keeps the answer true for every val_check_interval form and
    for ValidateOnLastStep's should_stop.
    """
    loop = trainer.fit_loop.epoch_loop
    return loop._should_check_val_fx(trainer.fit_loop._data_fetcher) and not loop._skip_next_val


def step_ended(trainer: L.Trainer) -> bool:
    """Whether the batch that just ended made an optimizer step (not one accumulating gradients)."""
    return not trainer.fit_loop._should_accumulate()


class StopOnSignal(Checkpoint):
    """Ctrl-C and SIGTERM stop training after the current optimizer step (and its validation),
    with a checkpoint that resumes bit-identical; SLURM's requeue signal saves hpc_ckpt_N.ckpt
    and requeues at the same point. A second Ctrl-C stops at once.

    A `Checkpoint`, so that Lightning runs its hooks after the other checkpoint callbacks: a
    requeue checkpoint saved after validation holds the best-model state of that validation.
    `stopped_by` says what stopped the run ("Ctrl-C", "SIGTERM"), `aborted` whether a second
    Ctrl-C cut the step short.
    """

    def __init__(self) -> None:
        self.stopped_by: str | None = None
        self.aborted = False
        self._asked: str | None = None  # what this process received, before the ranks agreed
        self._requeue_asked = False
        self._requeue_due = False
        self._stop_due = False
        self._trainer: L.Trainer | None = None

    # ------------------------------------------------------------------ the handlers

    def _on_stop(self, signum: int, frame: FrameType | None) -> None:
        what = CTRL_C if signum == signal.SIGINT else SIGTERM
        if what == CTRL_C and (self._asked or self.stopped_by):
            self.aborted = True
            raise KeyboardInterrupt  # a second Ctrl-C: at once, wherever the step is
        if self._asked is None:
            self._asked = what
            if what == CTRL_C and self._trainer is not None and self._trainer.is_global_zero:
                # os.write, not print: the handler may have interrupted a write to sys.stderr. On a
                # terminal, a line of its own below the progress bar.
                fd = sys.stderr.fileno()
                os.write(
                    fd,
                    (b"\n" if os.isatty(fd) else b"")
                    + b"Ctrl-C: stopping after this step and saving a checkpoint "
                    b"(Ctrl-C again stops at once, losing the steps since the last checkpoint)\n",
                )

    def _on_requeue(self, signum: int, frame: FrameType | None) -> None:
        self._requeue_asked = True

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Take over from Lightning's handlers, which it registers after restoring a checkpoint and
        puts back (with whatever was there before fit) when fit ends."""
        self._trainer = trainer
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread; Lightning's stay
        connector = trainer._signal_connector
        if connector.received_sigterm:  # a SIGTERM that came before training started
            connector.received_sigterm = False
            self._asked = SIGTERM
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGTERM, self._on_stop)
        environment = trainer._accelerator_connector.cluster_environment
        if isinstance(environment, SLURMEnvironment) and environment.auto_requeue:
            signal.signal(environment.requeue_signal, self._on_requeue)

    # ------------------------------------------------------------------ the step's end

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not step_ended(trainer):
            return
        self._agree(trainer)
        if not validates_after_step(trainer):
            self._act(trainer, validated=False)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning's validation loop stops after any batch once the flag is up: keep it down until
        # validation has ended (should a stop ever be due here before it).
        if trainer.state.fn == "fit" and trainer.received_sigterm and self.stopped_by:
            trainer._signal_connector.received_sigterm = False
            self._stop_due = True

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking and step_ended(trainer):
            self._agree(trainer)  # a signal that came during validation stops after it, too
            self._act(trainer, validated=True)

    def _agree(self, trainer: L.Trainer) -> None:
        """Turn what this process received into what every rank does, after this same step."""
        asked = (self._asked == CTRL_C, self._asked == SIGTERM, self._requeue_asked)
        if trainer.world_size > 1:
            if trainer.global_step % trainer.log_every_n_steps:
                return  # ranks agree on logging steps only: no host-device sync in between
            flags = torch.tensor(asked, dtype=torch.float32, device=trainer.strategy.root_device)
            asked = tuple(bool(f) for f in trainer.strategy.reduce(flags, reduce_op="max").tolist())
        ctrl_c, sigterm, requeue = asked
        if (ctrl_c or sigterm) and self.stopped_by is None:
            self.stopped_by = CTRL_C if ctrl_c else SIGTERM
            self._asked = self._asked or self.stopped_by  # a later Ctrl-C here aborts
            self._stop_due = True
        if requeue:
            self._requeue_asked = False
            self._requeue_due = True

    def _act(self, trainer: L.Trainer, validated: bool) -> None:
        if self._requeue_due:
            self._requeue_due = False
            # Lightning's own SLURM handler (checkpoint, requeue), called where a step has ended.
            trainer._signal_connector._slurm_sigusr_handler_fn(signal.SIGUSR1, None)
        if not self._stop_due or trainer.should_stop or 0 < trainer.max_steps <= trainer.global_step:
            return  # training ends after this step anyway (a request stays due should it go on)
        self._stop_due = False
        if validated:
            # Here, where Lightning's best checkpoint of this validation is saved. Later in this loop
            # iteration Lightning counts the step for its loggers (_batches_that_stepped), and a run
            # resumed from there would count it again: its logged steps one ahead.
            raise SIGTERMException
        # Lightning raises SIGTERMException at the end of this loop iteration.
        trainer._signal_connector.received_sigterm = True
