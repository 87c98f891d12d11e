"""Train a GPT: compose the Hydra config, turn it into dataclasses, check, build, fit.

Everything a user can get wrong (config, data, devices, checkpoint to resume) is checked before
Lightning is imported, so that a mistake is answered in about two seconds, not six.

python train.py                                   # nano model on Tiny Shakespeare, CPU-friendly
python train.py model=small trainer.devices=4     # any preset, any number of devices
"""

from __future__ import annotations

import logging
import os
import sys
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict

from gpt.config import DataConfig, ModelConfig, OptimConfig
from gpt.data.pairs import PreparedPairs, prepare_pairs
from gpt.data.prepare import Prepared, prepare
from gpt.errors import EXIT_INTERRUPTED, EXIT_PREEMPTED, ConfigError, exit_on_user_error
from gpt.runs.checkpoint import check_resumable, newest_checkpoint
from gpt.tokenizer import Tokenizer
from gpt.train.checks import accumulation_steps, check_devices, check_trainer_args, enable_tf32, val_windows
from gpt.train.init_from import InitSource, overridden_keys, resolve_init
from gpt.train.loggers import choose_wandb_mode, wandb_fields
from gpt.train.precision import device_type, resolve_precision
from gpt.train.resume import resolve_resume, resume_command
from gpt.train.rundir import (
    RunLock,
    check_free_space,
    checkpoint_bytes,
    is_launch_rank_zero,
    remove_partial_writes,
    save_run_config,
)

if TYPE_CHECKING:
    import lightning as L

    from gpt.data.datamodule import GPTDataModule
    from gpt.train.lit_module import GPTLitModule

log = logging.getLogger("train")  # to the console and <run dir>/train.log (conf/hydra/job_logging)
cs = ConfigStore.instance()
cs.store(group="model", name="_schema", node=ModelConfig)
cs.store(group="data", name="_schema", node=DataConfig)
cs.store(group="optim", name="_schema", node=OptimConfig)


def to_dataclasses(cfg: DictConfig) -> tuple[ModelConfig, DataConfig, OptimConfig]:
    """Validated configs (OmegaConf.to_object runs each dataclass's __post_init__)."""
    return OmegaConf.to_object(cfg.model), OmegaConf.to_object(cfg.data), OmegaConf.to_object(cfg.optim)


def vocab_size(requested: int | None, tokenizer_vocab: int) -> int:
    """The tokenizer's vocabulary, or a larger (padded) one the user asked for."""
    if requested is None:
        return tokenizer_vocab
    if requested < tokenizer_vocab:
        raise ConfigError(
            f"model.vocab_size={requested} is smaller than the tokenizer's {tokenizer_vocab} tokens; "
            "leave it null or pad it upward"
        )
    return requested


def choose_precision(cfg: DictConfig, width: int, notes: list[str]) -> None:
    """Replace trainer.precision=auto (and fp16 on a CPU) by what the Trainer gets."""
    precision, line, warning = resolve_precision(cfg.trainer.precision, cfg.trainer.accelerator, width)
    cfg.trainer.precision = precision
    notes += [line] if line else []
    notes += [f"warning: {warning}"] if warning else []


def pairs_notes(prepared: PreparedPairs, block_size: int) -> list[str]:
    """What the log says of paired data: the examples, and how many a row cannot hold whole."""
    n = prepared.n_examples("train")
    lines = [f"pairs: {n:,} training and {prepared.n_examples('val'):,} validation examples"]
    cut = prepared.n_truncated(block_size)
    if cut:
        lines.append(
            f"warning: {cut:,} of {n:,} training examples are longer than block_size + 1 = {block_size + 1} "
            "tokens and were truncated (their ends are not trained on); raise model.block_size to keep them"
        )
    return lines


def check(
    cfg: DictConfig, ckpt_path: str | None, notes: list[str]
) -> tuple[ModelConfig, DataConfig, OptimConfig, Prepared | PreparedPairs, Tokenizer, InitSource | None]:
    """Validate everything that needs no Lightning: configs, devices, the checkpoint to start from
    (init_from), the data (prepared on first use, cached on disk) against the model, and the
    checkpoint to resume against both. The decisions made on the way (precision, validation
    windows) are added to `notes`, to be logged once the start has succeeded: a failed start leaves
    an existing run dir's train.log as it was."""
    model_cfg, data_cfg, optim_cfg = to_dataclasses(cfg)
    pairs = data_cfg.source == "pairs"
    check_trainer_args(OmegaConf.to_container(cfg.trainer, resolve=True))
    check_devices(cfg.trainer.accelerator, cfg.trainer.devices)
    init = None
    if cfg.init_from:
        # The model config and tokenizer come from the checkpoint; a resumed run takes them from
        # its own checkpoint, which it continues instead.
        overridden = overridden_keys(HydraConfig.get().overrides.task)
        init = resolve_init(
            ckpt_path or cfg.init_from, model_cfg, data_cfg.tokenizer, overridden, need_eot=pairs
        )
        model_cfg = init.model_config
    if pairs and model_cfg.prefix_lm and not data_cfg.mask_prompt:
        raise ConfigError(
            "model.prefix_lm=true needs data.mask_prompt=true: a prompt token that sees the whole prompt "
            "would see the very token it is trained to predict"
        )
    choose_precision(cfg, model_cfg.n_embd, notes)
    if pairs:
        prepared = prepare_pairs(data_cfg, tokenizer=init.tokenizer if init else None)
        notes += pairs_notes(prepared, model_cfg.block_size)
    else:
        prepared = prepare(data_cfg, tokenizer=init.tokenizer if init else None)
    prepared.check_fits(model_cfg.block_size)
    tokenizer = prepared.tokenizer()
    model_cfg = replace(model_cfg, vocab_size=vocab_size(model_cfg.vocab_size, tokenizer.vocab_size))
    windows, line = val_windows(
        data_cfg.val_windows, device_type(cfg.trainer.accelerator), model_cfg.vocab_size
    )
    data_cfg = replace(data_cfg, val_windows=windows)
    notes += [line] if line else []
    if ckpt_path:  # another model or vocabulary: refused before anything is written to the run dir
        check_resumable(ckpt_path, model_cfg, tokenizer)
    return model_cfg, data_cfg, optim_cfg, prepared, tokenizer, init


def build(
    cfg: DictConfig, ckpt_path: str | None = None, notes: list[str] | None = None
) -> tuple[L.Trainer, GPTLitModule, GPTDataModule]:
    notes = [] if notes is None else notes
    model_cfg, data_cfg, optim_cfg, prepared, tokenizer, init = check(cfg, ckpt_path, notes)
    import lightning as L
    from lightning.pytorch.strategies.launchers import _SubprocessScriptLauncher

    from gpt.data.datamodule import GPTDataModule
    from gpt.data.pairs_datamodule import PairsDataModule
    from gpt.train.callbacks import Evaluate
    from gpt.train.checkpointing import AtomicCheckpointIO
    from gpt.train.console import quiet_lightning, quiet_stops
    from gpt.train.lit_module import GPTLitModule

    quiet_lightning()
    run_dir = HydraConfig.get().runtime.output_dir
    in_place = ckpt_path is not None and Path(ckpt_path).resolve().is_relative_to(Path(run_dir).resolve())
    quiet_stops(resuming_in_place=in_place)
    L.seed_everything(cfg.seed, workers=True)
    enable_tf32()
    pairs = isinstance(prepared, PreparedPairs)
    datamodule = (PairsDataModule if pairs else GPTDataModule)(
        data_cfg, block_size=model_cfg.block_size, seed=cfg.seed, prepared=prepared
    )
    # A model trained on pairs keeps its prompt template, so that generate.py formats prompts alike.
    # The data config, its val_windows resolved by check(), lets evaluate task=bpb score the same windows.
    module = GPTLitModule.from_configs(
        model_cfg, optim_cfg, tokenizer, data_format=prepared.data_format if pairs else None, data=data_cfg
    )
    if init and not ckpt_path:  # a resumed run continues from its own weights instead
        init.load_into(module.model)
        notes += init.notes()
    if cfg.compile:
        module.model.compile()  # in place: parameter names, and so checkpoints, are unchanged

    if "wandb" in cfg.logger:
        choose_wandb_mode()
        with open_dict(cfg):
            cfg.logger.wandb.update(
                {
                    k: v
                    for k, v in wandb_fields(HydraConfig.get().overrides.task, run_dir).items()
                    if cfg.logger.wandb.get(k) is None
                }
            )
    loggers = [hydra.utils.instantiate(c) for c in cfg.logger.values()]
    # Lightning's own switches win over the callbacks that stand for them: +trainer.enable_progress_bar=false
    # drops the bar (Lightning would refuse it next to the switch) and =true draws it to a file too;
    # trainer.enable_model_summary=false drops the summary.
    bar, summary = cfg.trainer.get("enable_progress_bar"), cfg.trainer.get("enable_model_summary")
    off = {name for name, switch in (("progress_bar", bar), ("model_summary", summary)) if switch is False}
    callbacks = [
        hydra.utils.instantiate(c, **({"terminal_only": False} if bar and name == "progress_bar" else {}))
        for name, c in cfg.callbacks.items()
        if name not in off
    ]
    # The summary is callbacks.model_summary: Lightning's switch would add its own (a rich box where
    # rich is installed) or log that it did not.
    parts = dict(
        logger=loggers, callbacks=callbacks, plugins=[AtomicCheckpointIO()], enable_model_summary=False
    )
    if "progress_bar" not in cfg.callbacks and bar is None:
        # ~callbacks.progress_bar means no bar, not Lightning's default one (rich's where installed).
        parts["enable_progress_bar"] = False
    trainer = hydra.utils.instantiate(cfg.trainer, **parts)
    if HydraConfig.get().mode == RunMode.MULTIRUN and isinstance(
        trainer.strategy.launcher, _SubprocessScriptLauncher
    ):
        # Lightning's default DDP launcher starts the other ranks by running the command again,
        # which under -m would start the whole sweep again in every rank: spawn them instead.
        if cfg.trainer.strategy != "auto":
            raise ConfigError(
                f"sweeps (-m) on several devices need trainer.strategy=ddp_spawn (or auto), not "
                f"{cfg.trainer.strategy}: with ddp each worker process would start the whole sweep again"
            )
        trainer = hydra.utils.instantiate(cfg.trainer, strategy="ddp_spawn", **parts)
    for callback in trainer.callbacks:  # read and check the evaluation's examples before training starts
        if isinstance(callback, Evaluate):
            line = callback.load(trainer.strategy, module, datamodule)
            notes += [line] if line else []
    if cfg.tokens_per_step:
        trainer.accumulate_grad_batches = accumulation_steps(
            cfg.tokens_per_step, data_cfg.batch_size, model_cfg.block_size, trainer.world_size
        )
    return trainer, module, datamodule


def checkpoint_room(trainer: L.Trainer, module: GPTLitModule) -> tuple[int, int]:
    """(bytes, files): about how much disk the run's checkpoints take at most at once."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    files = 2  # on_exception.ckpt, and the temporary file of the checkpoint being written
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint):
            files += max(callback.save_top_k, 1) + bool(callback.save_last)
    return checkpoint_bytes(module) * files, files


def resume_command_of_this_run(run_dir: str) -> str:
    if "TORCHELASTIC_RUN_ID" in os.environ:  # torchrun's command line is not ours to repeat
        return f"the same torchrun command, with hydra.run.dir={run_dir}"
    hydra_cfg = HydraConfig.get()
    sweep_job = list(hydra_cfg.overrides.task) if hydra_cfg.mode == RunMode.MULTIRUN else None
    return resume_command(sys.argv, run_dir, sweep_job)


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    hydra_cfg = HydraConfig.get()
    run_dir = hydra_cfg.runtime.output_dir
    # What Hydra would have written to .hydra/ before the config was even checked.
    run_config = {
        "config.yaml": OmegaConf.to_yaml(cfg),
        "hydra.yaml": OmegaConf.to_yaml(OmegaConf.create({"hydra": hydra_cfg})),
        "overrides.yaml": OmegaConf.to_yaml(list(hydra_cfg.overrides.task)),
    }
    rank_zero = is_launch_rank_zero()  # the other ranks' launcher process holds the lock for them
    # A start that fails before writing anything takes its new run dir (runs/<date>/<time>/) away.
    try:
        with RunLock(run_dir, cleanup_below=hydra_cfg.runtime.cwd) if rank_zero else nullcontext():
            if rank_zero:
                remove_partial_writes(run_dir)
            fit(cfg, run_dir, run_config, rank_zero)
    except KeyboardInterrupt:  # Ctrl-C while the data is prepared or the model built
        if rank_zero:
            below_ctrl_c_echo()
            log.warning("stopped by Ctrl-C before training started")
        sys.exit(EXIT_INTERRUPTED)


def below_ctrl_c_echo() -> None:
    """On a terminal, start a new line below the ^C it echoed."""
    if sys.stdout.isatty():
        print()


def fit(cfg: DictConfig, run_dir: str, run_config: dict[str, str], rank_zero: bool) -> None:
    ckpt_path = resolve_resume(cfg.ckpt_path, run_dir)
    notes: list[str] = []
    trainer, module, datamodule = build(cfg, ckpt_path, notes)
    if rank_zero:
        needed, files = checkpoint_room(trainer, module)
        check_free_space(run_dir, needed, f"{files} checkpoints of the model and its optimizer state")
        save_run_config(run_dir, run_config)
    # Only now: the CSV logger makes its csv/version_N/ on the first write.
    for logger in trainer.loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
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
        report_stop(trainer, run_dir, f"stopped by {what} after step {trainer.global_step}")
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
        report_stop(trainer, run_dir, what)
        sys.exit(EXIT_INTERRUPTED)


def report_stop(trainer: L.Trainer, run_dir: str, what: str) -> None:
    """One line, on the console and in train.log: what stopped the run, where it continues from
    and the command that continues it."""
    from gpt.train.checkpointing import saved_step

    if not trainer.is_global_zero:
        return
    newest = newest_checkpoint(run_dir)
    command = resume_command_of_this_run(run_dir)
    if newest is None:
        log.warning(f"{what}; no checkpoint was saved yet, so this starts it again: {command}")
        return
    step = saved_step(str(newest))
    if step == trainer.global_step:
        log.warning(f"{what}, saved as {newest}; continue with: {command}")
    else:
        log.warning(f"{what}; continue from step {step} ({newest}) with: {command}")


if __name__ == "__main__":
    exit_on_user_error(main)()
