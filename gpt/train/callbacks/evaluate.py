"""Evaluate: an evaluation task (gpt.evaluate) every N steps and at the end, logged as
eval/<task>/<metric>."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.strategies import FSDPStrategy

from gpt.config import FROM_CHECKPOINT, DataConfig, DecodeConfig, check_eval_task
from gpt.data.pairs import PreparedPairs, data_format
from gpt.data.sources import data_root, find_files
from gpt.errors import ConfigError, UserError
from gpt.evaluate.bpb import bpb_data, bpb_windows
from gpt.evaluate.choice import hellaswag_file
from gpt.evaluate.examples import EvalExample, encode_examples, example_from_tokens
from gpt.evaluate.results import write_jsonl
from gpt.evaluate.tasks import (
    CHOICE_TASKS,
    additive,
    prompt_template,
    read_choice_examples,
    read_pairs,
    score,
    task_metrics,
)
from gpt.templates import Template
from gpt.train.callbacks.lines import report

# What callbacks.evaluate.path should be, by task.
PATH_HELP = {
    "generate": "pass a .jsonl file of prompt -> completion pairs",
    "hellaswag": "pass HellaSwag's hellaswag_val.jsonl, or null for the data root's",
    "mc": "pass a .jsonl file of multiple-choice rows (context, choices, label)",
    "bpb": "pass a text file or folder, or null for the training data",
}


def held_out_examples(datamodule: L.LightningDataModule | None) -> list[EvalExample] | None:
    """The run's held-out validation examples, when it trains on pairs; None otherwise."""
    prepared = getattr(datamodule, "prepared", None)
    if not isinstance(prepared, PreparedPairs):
        return None
    tokenizer, val = prepared.tokenizer(), prepared.examples("val")
    return [
        example_from_tokens(*val[i], tokenizer, f"val example {int(val.index[i]) + 1}")
        for i in range(len(val))
    ]


class Evaluate(L.Callback):
    """Every N optimizer steps and when training ends, run an evaluation task (gpt.evaluate) and log
    its metrics as eval/<task>/<metric> to every logger (the CSV log, wandb). every_n_steps None
    (or 0) turns it off.

    Reading and scoring are gpt.evaluate.tasks', which evaluate.py calls too; this callback decides
    when, on which ranks, and where the results go. The tasks (docs/evaluation.md):
    - generate: complete `limit` prompt -> completion pairs with each method of `decoding`; metrics
      eval/generate/<method>/<metric>, each example's outputs in <run dir>/evals/step-N.jsonl. The
      pairs: the file `path` (read with `template` and `fields`, by default the training data's),
      else the run's held-out val examples when it trains on pairs; with neither, it says so once
      and does nothing.
    - hellaswag: the first `limit` examples of HellaSwag's validation set (`path`, else the data root's
      hellaswag_val.jsonl, downloaded once); acc and acc_norm.
    - mc: the first `limit` rows of the multiple-choice JSONL `path` (`fields` renames context,
      choices, label); acc and acc_norm.
    - bpb: bits per byte, loss and perplexity on the `windows` windows (val or all) of the val split of
      the text corpus `path` (a file or folder), else of the training data (which val/bpb already is).

    Under DDP, hellaswag, mc and bpb are shared out: each rank scores every world_size-th example
    (window), and the sums (correct answers, nats, bytes) are added up over the ranks before rank
    zero logs them. generate's chrF and BLEU are corpus scores, which do not add up, so rank zero
    generates alone while the other ranks wait at a barrier. Under FSDP no rank holds the whole
    model, so there it says so once and does nothing.
    """

    def __init__(
        self,
        every_n_steps: int | None = None,
        task: str = "generate",
        path: str | None = None,
        limit: int | None = 64,
        template: str | None = FROM_CHECKPOINT,
        fields: Mapping[str, str] | None = None,
        windows: str = "val",
        decoding: DecodeConfig | Mapping[str, Any] | None = None,
    ) -> None:
        if every_n_steps is not None and every_n_steps < 0:
            raise ValueError(f"callbacks.evaluate.every_n_steps={every_n_steps} must be >= 1 (or null: off)")
        check_eval_task(task, limit, windows, "callbacks.evaluate.")
        self.every_n_steps, self.task, self.path, self.limit = (
            every_n_steps or None,
            task,
            path or None,
            limit,
        )
        self.windows = windows
        on = self.every_n_steps is not None
        if on and task == "mc" and self.path is None:
            raise ConfigError(
                "callbacks.evaluate.task=mc needs its questions: set callbacks.evaluate.path=FILE.jsonl"
            )
        if on and self.path and not Path(self.path).expanduser().exists():
            # Before training starts: its rows are read at fit start.
            raise UserError(f"callbacks.evaluate.path={self.path} does not exist; {PATH_HELP[task]}")
        if on and task == "hellaswag":  # found (or downloaded, checked) before training starts
            self.path = (
                str(Path(self.path).expanduser())
                if self.path
                else str(hellaswag_file(data_root(DataConfig())))
            )
        # null: the spelling before `checkpoint`, the same thing.
        self.template = template or FROM_CHECKPOINT
        self.fields = dict(fields) if fields is not None else None
        # From conf/ a plain mapping, checked as evaluate.py's keys are.
        mapping = isinstance(decoding, Mapping)
        self.decoding = DecodeConfig(**decoding) if mapping else decoding or DecodeConfig()
        self.examples: Sequence[Any] = []
        self._loaded = False  # examples read by load() for the coming fit
        self._last_step: int | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._loaded:
            line = self.load(trainer.strategy, pl_module, trainer.datamodule)
            if line:
                report(line)
        self._loaded, self._last_step = False, None  # read again by the next fit

    def load(self, strategy: Any, pl_module: L.LightningModule, datamodule: Any) -> str | None:
        """Read (and check) what the task scores; returns the line saying what will be evaluated.

        train.py calls it before training starts, so that a row the model cannot score stops the
        command before anything is written; a Trainer without train.py reads at fit start.
        """
        self.examples, self._loaded = [], True
        if self.every_n_steps is None:
            return None
        if isinstance(strategy, FSDPStrategy):
            return "callbacks.evaluate: off under FSDP, where no rank holds the whole model"
        # Every rank reads them, so that a bad file stops every rank alike.
        examples = self.read(datamodule, pl_module)
        if examples is None:
            return (
                "callbacks.evaluate: no examples to evaluate (callbacks.evaluate.path is null and the "
                "training data has no held-out pairs); evaluation is off"
            )
        self.examples = examples
        where = self.path or ("the held-out val examples" if self.task == "generate" else "the training data")
        what = f"{len(examples)} {'windows' if self.task == 'bpb' else 'examples'} of {where}"
        how = f", {', '.join(self.decoding.methods)}" if self.task == "generate" else ""
        every = f"every {self.every_n_steps} steps and at the end"
        return f"callbacks.evaluate: task {self.task}, {what}, {every}{how}"

    def data_config(self, datamodule: Any) -> DataConfig | None:
        """The training data's config, when it is pairs."""
        cfg = getattr(datamodule, "cfg", None)
        return cfg if isinstance(cfg, DataConfig) and cfg.source == "pairs" else None

    def prompt_template(self, datamodule: Any, pl_module: L.LightningModule) -> Template:
        """`template`; for `checkpoint` the module's saved data_format, else the training data's
        template, else plain."""
        fmt = getattr(pl_module, "hparams", {}).get("data_format")
        if not isinstance(fmt, Mapping):
            data = self.data_config(datamodule)
            fmt = data_format(data) if data is not None else None
        return prompt_template(self.template, fmt)[0]

    def read(self, datamodule: Any, pl_module: L.LightningModule) -> Sequence[Any] | None:
        """What the task scores: examples (generate, hellaswag, mc) or windows (bpb); None: nothing."""
        path = self.path
        if self.task in CHOICE_TASKS:
            file = Path(path).expanduser()
            # With the tokenizer: a row the model cannot score stops it here, not mid-run.
            tokenizer, block_size = pl_module.tokenizer, pl_module.model.config.block_size
            return read_choice_examples(self.task, file, self.fields, self.limit, tokenizer, block_size)
        if self.task == "bpb":
            train_data = getattr(datamodule, "cfg", None)
            if path is None and not (isinstance(train_data, DataConfig) and train_data.source != "pairs"):
                return None
            data = bpb_data(DataConfig(source="text", path=path), None, Path(path)) if path else train_data
            block_size = pl_module.model.config.block_size
            return bpb_windows(data, pl_module.tokenizer, block_size, self.windows, self.limit)
        if path is None:
            examples = held_out_examples(datamodule)
            return None if examples is None else examples[: self.limit]
        data = self.data_config(datamodule)
        fields = self.fields if self.fields is not None else (data.fields if data is not None else {})
        cfg = DataConfig(source="pairs", path=path, fields=fields)
        rows = read_pairs(cfg, find_files(cfg), self.prompt_template(datamodule, pl_module), self.limit)
        return encode_examples(rows, pl_module.tokenizer)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: object) -> None:
        step = trainer.global_step
        if (
            not self.examples
            or step == 0
            or step % self.every_n_steps
            or trainer.fit_loop._should_accumulate()
        ):
            return
        self.run(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.examples and trainer.global_step != self._last_step:
            self.run(trainer, pl_module)

    def run(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        step = self._last_step = trainer.global_step
        if additive(self.task):
            # This rank's share, then the sums over all ranks: every rank computes the same metrics.
            share = self.examples[trainer.global_rank :: trainer.world_size]
            sums = score(self.task, pl_module.model, pl_module.tokenizer, share, self.decoding).sums
            names = sorted(sums)
            local = torch.tensor(
                [float(sums[k]) for k in names], dtype=torch.float64, device=pl_module.device
            )
            total = trainer.strategy.reduce(local, reduce_op="sum")
            metrics = task_metrics(self.task, dict(zip(names, total.tolist(), strict=True)))
        else:
            metrics = self.generate(trainer, pl_module, step)
        if trainer.is_global_zero:
            flat = {f"eval/{self.task}/{name}": value for name, value in metrics.items()}
            # Straight to the loggers, as lit_module logs train/ metrics: at this step, on every logger.
            for logger in trainer.loggers:
                logger.log_metrics(flat, step=step)
            shown = ", ".join(
                f"{name} {value:.{2 if self.task != 'bpb' else 4}f}" for name, value in metrics.items()
            )
            report(f"evaluation ({self.task}) at step {step}: {shown}")

    def generate(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> dict[str, float]:
        """Rank zero generates and scores (the others wait): {method/metric: value} on rank zero."""
        metrics: dict[str, float] = {}
        if trainer.is_global_zero:
            scored = score(self.task, pl_module.model, pl_module.tokenizer, self.examples, self.decoding)
            metrics = task_metrics(self.task, scored.sums)
            write_jsonl(Path(trainer.default_root_dir) / "evals" / f"step-{step}.jsonl", scored.records)
        trainer.strategy.barrier("callbacks.evaluate")
        return metrics
