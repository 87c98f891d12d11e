"""A training run set up from its configs: everything a user can get wrong checked before Lightning is
imported (check), then the Trainer, module and data module built (build).

train.py turns Hydra's config into a TrainJob (dataclasses, plain dicts) and a HydraRun (what Hydra
knows of the run); nothing here imports Hydra. The `_target_` parts (trainer, callbacks, loggers) are
built by the `instantiate` the entry point passes in (hydra.utils.instantiate takes plain dicts).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gpt.config import DataConfig, ModelConfig, OptimConfig
from gpt.data.pairs import PreparedPairs, prepare_pairs
from gpt.data.prepare import Prepared, prepare
from gpt.data.windows import document_separator
from gpt.errors import ConfigError
from gpt.runs.checkpoint import check_resumable
from gpt.tokenizer import Tokenizer
from gpt.train.checks import accumulation_steps, check_devices, check_trainer_args, enable_tf32, val_windows
from gpt.train.init_from import InitSource, overridden_keys, resolve_init
from gpt.train.loggers import choose_wandb_mode, wandb_fields
from gpt.train.precision import device_type, resolve_precision

if TYPE_CHECKING:
    import lightning as L

    from gpt.data.datamodule import GPTDataModule
    from gpt.train.lit_module import GPTLitModule


@dataclass
class HydraRun:
    """What Hydra knows of this run, as plain data."""

    run_dir: str
    cwd: str  # where the command was started (a new run dir is removed up to there if the start fails)
    overrides: list[str]  # the task's overrides, as typed
    multirun: bool = False  # -m
    argv: list[str] = field(default_factory=list)
    record: dict[str, str] = field(default_factory=dict)  # the .hydra/ files, written once checks pass


@dataclass
class TrainJob:
    """train.yaml as typed configs and plain dicts. `trainer`, `callbacks` and `logger` are the same
    dicts as `config`'s, so that what check() and build() decide (precision, wandb fields) is logged
    as the run's hyperparameters too."""

    model: ModelConfig
    data: DataConfig
    optim: OptimConfig
    config: dict[str, Any]  # the whole resolved config
    instantiate: Callable[..., Any]  # builds a `_target_` dict, with keyword arguments added

    @property
    def trainer(self) -> dict[str, Any]:
        return self.config["trainer"]

    @property
    def callbacks(self) -> dict[str, Any]:
        return self.config["callbacks"]

    @property
    def logger(self) -> dict[str, Any]:
        return self.config["logger"]


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


def choose_precision(trainer: dict[str, Any], width: int, notes: list[str]) -> None:
    """Replace trainer.precision=auto (and fp16 on a CPU) by what the Trainer gets."""
    precision, line, warning = resolve_precision(trainer["precision"], trainer["accelerator"], width)
    trainer["precision"] = precision
    notes += [line] if line else []
    notes += [f"warning: {warning}"] if warning else []


def pairs_notes(prepared: PreparedPairs, block_size: int, seq2seq: bool = False) -> list[str]:
    """What the log says of paired data: the examples, and how many a row cannot hold whole."""
    n = prepared.n_examples("train")
    lines = [f"pairs: {n:,} training and {prepared.n_examples('val'):,} validation examples"]
    cut = prepared.n_truncated(block_size, seq2seq=seq2seq)
    if cut:
        longer = (
            f"a source or target longer than block_size = {block_size}"
            if seq2seq
            else (f"longer than block_size + 1 = {block_size + 1} tokens")
        )
        lines.append(
            f"warning: {cut:,} of {n:,} training examples are {longer} and were truncated (their "
            "ends are not trained on); raise model.block_size to keep them"
        )
    return lines


def check(
    job: TrainJob, run: HydraRun, ckpt_path: str | None, notes: list[str]
) -> tuple[ModelConfig, DataConfig, Prepared | PreparedPairs, Tokenizer, InitSource | None]:
    """Validate everything that needs no Lightning: configs, devices, the checkpoint to start from
    (init_from), the data (prepared on first use, cached on disk) against the model, and the
    checkpoint to resume against both. The decisions made on the way (precision, validation
    windows) are added to `notes`, to be logged once the start has succeeded: a failed start leaves
    an existing run dir's train.log as it was."""
    model_cfg, data_cfg = job.model, job.data
    pairs = data_cfg.source == "pairs"
    check_trainer_args(job.trainer)
    check_devices(job.trainer["accelerator"], job.trainer["devices"])
    init = None
    if job.config["init_from"]:
        # The model config and tokenizer come from the checkpoint; a resumed run takes them from
        # its own checkpoint, which it continues instead.
        init = resolve_init(
            ckpt_path or job.config["init_from"],
            model_cfg,
            data_cfg.tokenizer,
            overridden_keys(run.overrides),
            need_eot=pairs,
        )
        model_cfg = init.model_config
    seq2seq = model_cfg.arch == "encoder_decoder"
    if seq2seq and not pairs:
        raise ConfigError(
            f"model.arch=encoder_decoder trains on prompt -> completion pairs (data=pairs), not on "
            f"data={data_cfg.source}: its encoder reads each prompt, its decoder writes the completion"
        )
    if seq2seq and not data_cfg.mask_prompt:
        raise ConfigError(
            "data.mask_prompt=false trains on the prompt tokens, which model.arch=encoder_decoder reads "
            "with its encoder and never predicts; leave data.mask_prompt=true"
        )
    if pairs and model_cfg.prefix_lm and not data_cfg.mask_prompt:
        raise ConfigError(
            "model.prefix_lm=true needs data.mask_prompt=true: a prompt token that sees the whole prompt "
            "would see the very token it is trained to predict"
        )
    choose_precision(job.trainer, model_cfg.n_embd, notes)
    if pairs:
        prepared = prepare_pairs(data_cfg, tokenizer=init.tokenizer if init else None)
        notes += pairs_notes(prepared, model_cfg.block_size, seq2seq)
    else:
        prepared = prepare(data_cfg, tokenizer=init.tokenizer if init else None)
    prepared.check_fits(model_cfg.block_size)
    tokenizer = prepared.tokenizer()
    if data_cfg.doc_mask:  # a corpus tokenized by characters has no end-of-text token to mask by
        document_separator(tokenizer)
    model_cfg = replace(model_cfg, vocab_size=vocab_size(model_cfg.vocab_size, tokenizer.vocab_size))
    if seq2seq:  # the decoder starts from the end-of-text token (pairs need one)
        model_cfg = replace(model_cfg, decoder_start=tokenizer.eot_token)
    windows, line = val_windows(
        data_cfg.val_windows, device_type(job.trainer["accelerator"]), model_cfg.vocab_size
    )
    data_cfg = replace(data_cfg, val_windows=windows)
    notes += [line] if line else []
    if ckpt_path:  # another model or vocabulary: refused before anything is written to the run dir
        check_resumable(ckpt_path, model_cfg, tokenizer)
    return model_cfg, data_cfg, prepared, tokenizer, init


def build(
    job: TrainJob, run: HydraRun, ckpt_path: str | None = None, notes: list[str] | None = None
) -> tuple[L.Trainer, GPTLitModule, GPTDataModule]:
    notes = [] if notes is None else notes
    model_cfg, data_cfg, prepared, tokenizer, init = check(job, run, ckpt_path, notes)
    import lightning as L

    from gpt.data.datamodule import GPTDataModule
    from gpt.data.pairs_datamodule import PairsDataModule
    from gpt.train.console import quiet_lightning, quiet_stops
    from gpt.train.lit_module import GPTLitModule

    quiet_lightning()
    in_place = ckpt_path is not None and Path(ckpt_path).resolve().is_relative_to(Path(run.run_dir).resolve())
    quiet_stops(resuming_in_place=in_place)
    seed = job.config["seed"]
    L.seed_everything(seed, workers=True)
    enable_tf32()
    pairs = isinstance(prepared, PreparedPairs)
    if pairs:
        datamodule = PairsDataModule(
            data_cfg,
            block_size=model_cfg.block_size,
            seed=seed,
            prepared=prepared,
            decoder_start=model_cfg.decoder_start,
        )
    else:
        datamodule = GPTDataModule(data_cfg, block_size=model_cfg.block_size, seed=seed, prepared=prepared)
    # A model trained on pairs keeps its prompt template, so that generate.py formats prompts alike.
    # The data config, its val_windows resolved by check(), lets evaluate task=bpb score the same windows.
    module = GPTLitModule.from_configs(
        model_cfg, job.optim, tokenizer, data_format=prepared.data_format if pairs else None, data=data_cfg
    )
    if init and not ckpt_path:  # a resumed run continues from its own weights instead
        init.load_into(module.model)
        notes += init.notes()
    if job.config["compile"]:
        module.model.compile()  # in place: parameter names, and so checkpoints, are unchanged
    trainer = build_trainer(job, run)
    notes += preload_evaluation(trainer, module, datamodule)
    if job.config["tokens_per_step"]:
        trainer.accumulate_grad_batches = accumulation_steps(
            job.config["tokens_per_step"], data_cfg.batch_size, model_cfg.block_size, trainer.world_size
        )
    return trainer, module, datamodule


def build_trainer(job: TrainJob, run: HydraRun) -> L.Trainer:
    """The Trainer with the loggers and callbacks of the config."""
    from lightning.pytorch.strategies.launchers import _SubprocessScriptLauncher

    from gpt.train.checkpointing import AtomicCheckpointIO

    if "wandb" in job.logger:
        choose_wandb_mode()
        wandb = job.logger["wandb"]
        wandb.update(
            {k: v for k, v in wandb_fields(run.overrides, run.run_dir).items() if wandb.get(k) is None}
        )
    loggers = [job.instantiate(c) for c in job.logger.values()]
    # Lightning's own switches win over the callbacks that stand for them: +trainer.enable_progress_bar=false
    # drops the bar (Lightning would refuse it next to the switch) and =true draws it to a file too;
    # trainer.enable_model_summary=false drops the summary.
    bar, summary = job.trainer.get("enable_progress_bar"), job.trainer.get("enable_model_summary")
    off = {name for name, switch in (("progress_bar", bar), ("model_summary", summary)) if switch is False}
    callbacks = [
        job.instantiate(c, **({"terminal_only": False} if bar and name == "progress_bar" else {}))
        for name, c in job.callbacks.items()
        if name not in off
    ]
    # The summary is callbacks.model_summary: Lightning's switch would add its own (a rich box where
    # rich is installed) or log that it did not.
    parts = dict(
        logger=loggers, callbacks=callbacks, plugins=[AtomicCheckpointIO()], enable_model_summary=False
    )
    if "progress_bar" not in job.callbacks and bar is None:
        # ~callbacks.progress_bar means no bar, not Lightning's default one (rich's where installed).
        parts["enable_progress_bar"] = False
    trainer = job.instantiate(job.trainer, **parts)
    if run.multirun and isinstance(trainer.strategy.launcher, _SubprocessScriptLauncher):
        # Lightning's default DDP launcher starts the other ranks by running the command again,
        # which under -m would start the whole sweep again in every rank: spawn them instead.
        if job.trainer["strategy"] != "auto":
            raise ConfigError(
                f"sweeps (-m) on several devices need trainer.strategy=ddp_spawn (or auto), not "
                f"{job.trainer['strategy']}: with ddp each worker process would start the whole sweep again"
            )
        trainer = job.instantiate(job.trainer, strategy="ddp_spawn", **parts)
    return trainer


def preload_evaluation(trainer: L.Trainer, module: GPTLitModule, datamodule: GPTDataModule) -> list[str]:
    """Read and check the evaluation's examples before training starts."""
    from gpt.train.callbacks import Evaluate

    notes = []
    for callback in trainer.callbacks:
        if isinstance(callback, Evaluate):
            line = callback.load(trainer.strategy, module, datamodule)
            notes += [line] if line else []
    return notes
