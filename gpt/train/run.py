"""What train.py does once its config is composed: lock the run dir, build, fit, and say in one line
what stopped a run early and the command that continues it (exit 130 for Ctrl-C, 143 for SIGTERM)."""

from __future__ import annotations

import copy
import logging
import os
import sys
from collections.abc import Callable
from contextlib import nullcontext
from typing import TYPE_CHECKING

from gpt.errors import EXIT_INTERRUPTED, EXIT_PREEMPTED
from gpt.runs.checkpoint import newest_checkpoint
from gpt.train.resume import resolve_resume, resume_command
from gpt.train.rundir import (
    RunLock,
    check_free_space,
    checkpoint_bytes,
    is_launch_rank_zero,
    remove_partial_writes,
    save_run_config,
)
from gpt.train.setup import HydraRun, TrainJob, build

if TYPE_CHECKING:
    import lightning as L

    from gpt.train.lit_module import GPTLitModule

log = logging.getLogger("train")  # to the console and <run dir>/train.log (conf/hydra/job_logging)


def train(run: HydraRun, make_job: Callable[[], TrainJob]) -> None:
    """`make_job` validates the config; it is called under the run-dir lock, so that a config that
    fails takes a new run dir away again and a busy run dir is reported first."""
    rank_zero = is_launch_rank_zero()  # the other ranks' launcher process holds the lock for them
    # A start that fails before writing anything takes its new run dir (runs/<date>/<time>/) away.
    try:
        with RunLock(run.run_dir, cleanup_below=run.cwd) if rank_zero else nullcontext():
            if rank_zero:
                remove_partial_writes(run.run_dir)
            fit(make_job(), run, rank_zero)
    except KeyboardInterrupt:  # Ctrl-C while the data is prepared or the model built
        if rank_zero:
            below_ctrl_c_echo()
            log.warning("stopped by Ctrl-C before training started")
        sys.exit(EXIT_INTERRUPTED)


def below_ctrl_c_echo() -> None:
    """On a terminal, start a new line below the ^C it echoed."""
    if sys.stdout.isatty():
        print()


def checkpoint_room(trainer: L.Trainer, module: GPTLitModule) -> tuple[int, int]:
    """(bytes, files): about how much disk the run's checkpoints take at most at once."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    files = 2  # on_exception.ckpt, and the temporary file of the checkpoint being written
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint):
            files += max(callback.save_top_k, 1) + bool(callback.save_last)
    return checkpoint_bytes(module) * files, files


def fit(job: TrainJob, run: HydraRun, rank_zero: bool) -> None:
    run_dir = run.run_dir
    ckpt_path = resolve_resume(job.config["ckpt_path"], run_dir)
    notes: list[str] = []
    trainer, module, datamodule = build(job, run, ckpt_path, notes)
    if rank_zero:
        needed, files = checkpoint_room(trainer, module)
        check_free_space(run_dir, needed, f"{files} checkpoints of the model and its optimizer state")
        save_run_config(run_dir, run.record)
    # Only now: the CSV logger makes its csv/version_N/ on the first write.
    for logger in trainer.loggers:
        logger.log_hyperparams(copy.deepcopy(job.config))
    if trainer.is_global_zero:
        for note in notes:
            log.log(logging.WARNING if note.startswith("warning:") else logging.INFO, note)
        log.info(f"run dir: {run_dir}" + (f"; resuming from {ckpt_path}" if ckpt_path else ""))
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from gpt.train.signals import CTRL_C, SIGTERM, StopOnSignal

    stop = next((c for c in trainer.callbacks if isinstance(c, StopOnSignal)), None)
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    except SIGTERMException:
        # Stopped after a step by Ctrl-C or SIGTERM (gpt.train.signals), on_exception.ckpt saved;
        # Lightning would exit 0, which a scheduler reads as "finished".
        what = (stop and stop.stopped_by) or SIGTERM
        report_stop(trainer, run, f"stopped by {what} after step {trainer.global_step}")
        sys.exit(EXIT_INTERRUPTED if what == CTRL_C else EXIT_PREEMPTED)
    except (KeyboardInterrupt, SystemExit) as e:
        # Lightning turns a KeyboardInterrupt into sys.exit(1); a second Ctrl-C raises one mid-step,
        # or while on_exception.ckpt is saved after the stop (Lightning lets that one through).
        interrupt = e.__context__ if isinstance(e, SystemExit) else e
        if not isinstance(interrupt, KeyboardInterrupt):
            raise
        below_ctrl_c_echo()
        if stop is not None and stop.aborted and isinstance(interrupt.__context__, SIGTERMException):
            what = f"stopped at once by a second Ctrl-C while saving after step {trainer.global_step}"
        elif stop is not None and stop.aborted:
            what = f"stopped at once by a second Ctrl-C during step {trainer.global_step + 1}"
        else:
            what = f"stopped by Ctrl-C before training started at step {trainer.global_step}"
        report_stop(trainer, run, what)
        sys.exit(EXIT_INTERRUPTED)


def resume_command_of_this_run(run: HydraRun) -> str:
    if "TORCHELASTIC_RUN_ID" in os.environ:  # torchrun's command line is not ours to repeat
        return f"the same torchrun command, with hydra.run.dir={run.run_dir}"
    return resume_command(run.argv, run.run_dir, list(run.overrides) if run.multirun else None)


def report_stop(trainer: L.Trainer, run: HydraRun, what: str) -> None:
    """One line, on the console and in train.log: what stopped the run, where it continues from
    and the command that continues it."""
    from gpt.train.checkpointing import saved_step

    if not trainer.is_global_zero:
        return
    newest = newest_checkpoint(run.run_dir)
    command = resume_command_of_this_run(run)
    if newest is None:
        log.warning(f"{what}; no checkpoint was saved yet, so this starts it again: {command}")
        return
    step = saved_step(str(newest))
    if step == trainer.global_step:
        log.warning(f"{what}, saved as {newest}; continue with: {command}")
    else:
        log.warning(f"{what}; continue from step {step} ({newest}) with: {command}")
