"""Callbacks Lightning does not ship: validate on the last step, stop on non-finite values, throughput,
text samples, evaluation by generation, the run report."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from itertools import islice
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ThroughputMonitor
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn

from gpt.config import DataConfig, DecodeConfig, SamplingConfig, sampling_config
from gpt.data.pairs import PreparedPairs, Template, format_prompt, get_template, read_examples, template_of
from gpt.data.sources import find_files
from gpt.errors import NonFiniteError, UserError
from gpt.evaluate.command import write_jsonl
from gpt.evaluate.decode import evaluate
from gpt.evaluate.examples import EvalExample, encode_examples, example_from_tokens
from gpt.generate.text import generate_text
from gpt.runs.checkpoint import newest_checkpoint
from gpt.train.checkpointing import saved_step

log = logging.getLogger(__name__)


class ValidateOnLastStep(L.Callback):
    """Validate after the last optimizer step too, not only every val_check_interval steps.

    Without it a run of 2,000 steps validating every 300 ends with no validation of its final
    weights, and its best checkpoint never considers them. Lightning validates when a callback asks
    training to stop (`should_stop`); at max_steps training stops anyway, so asking changes nothing
    else.
    """

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        if 0 < trainer.max_steps <= trainer.global_step:
            trainer.should_stop = True


class NonFiniteGuard(L.Callback):
    """Check every optimizer step's loss and gradient before the update; on a NaN or inf, stop
    (action="stop") or skip that update (action="skip").

    Stopping raises NonFiniteError before the update, so the weights never become non-finite and
    no checkpoint of them is written; the message names the step and the newest checkpoint.
    Skipping drops the step's gradients (the optimizer then leaves every weight and its state as
    they were; the LR schedule moves on) and stops after `max_skips` skipped steps in a row, since
    then it is the weights, not a batch, that are bad. Under 16-mixed, GradScaler already skips
    steps with inf/NaN gradients and lowers its scale, so only the loss is checked there.

    The check costs one host-device sync per optimizer step, and one all-reduce of a flag so that
    every rank decides the same.
    """

    def __init__(self, action: str = "stop", max_skips: int = 10) -> None:
        if action not in ("stop", "skip"):
            raise ValueError(f"callbacks.nonfinite.action={action!r}: use stop or skip")
        self.action, self.max_skips = action, max_skips
        self._loss_bad: torch.Tensor | None = None
        self.skipped_in_a_row = 0

    def on_before_backward(
        self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor
    ) -> None:
        bad = ~torch.isfinite(loss.detach())
        self._loss_bad = bad if self._loss_bad is None else self._loss_bad | bad

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        loss_bad, self._loss_bad = self._loss_bad, None
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        bad = torch.zeros((), dtype=torch.bool, device=pl_module.device) if loss_bad is None else loss_bad
        if getattr(trainer.precision_plugin, "scaler", None) is None:
            bad = bad | ~torch.isfinite(torch.nn.utils.get_total_norm(grads))
        if not trainer.strategy.reduce_boolean_decision(bool(bad), all=False):
            self.skipped_in_a_row = 0
            return
        step = trainer.global_step
        what = "loss" if loss_bad is not None and bool(loss_bad) else "gradient"
        if self.action == "skip" and self.skipped_in_a_row < self.max_skips:
            self.skipped_in_a_row += 1
            for p in pl_module.parameters():
                p.grad = None
            rank_zero_warn(f"step {step}: non-finite {what}, update skipped (nonfinite.action=skip)")
            return
        good = newest_checkpoint(trainer.default_root_dir)
        after = f" after {self.max_skips} skipped steps in a row" if self.action == "skip" else ""
        raise NonFiniteError(
            f"non-finite {what} at step {step}{after}; training stopped before updating the weights. "
            + (f"Last good checkpoint: {good}. " if good else "No checkpoint was saved yet. ")
            + "Try a lower optim.lr, more warmup or bf16 instead of 16-mixed, or skip such steps "
            "with callbacks.nonfinite.action=skip"
        )


def _inputs(batch: tuple[torch.Tensor, torch.Tensor] | Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The input ids of a text batch (x, y) or a pairs batch (a dict)."""
    return batch["idx"] if isinstance(batch, Mapping) else batch[0]


def _batch_size(batch: tuple[torch.Tensor, torch.Tensor] | Mapping[str, torch.Tensor]) -> int:
    return _inputs(batch).size(0)


def _batch_tokens(batch: tuple[torch.Tensor, torch.Tensor] | Mapping[str, torch.Tensor]) -> int:
    # Positions computed, padding of pairs rows included (counting real tokens would sync a GPU).
    return _inputs(batch).numel()


class Throughput(ThroughputMonitor):
    """Lightning's ThroughputMonitor for token batches: batches, samples and tokens ("items")
    per second, FLOP/s from the module's `flops_per_batch`, and MFU.

    peak_flops: one device's peak FLOP/s for the training dtype. None uses Lightning's table, which
    misses many chips and lists H100 NVL / H200 bf16 at their sparse figures; pass the dense peak
    for those (989e12 for H100 SXM and H200 bf16).
    """

    def __init__(self, peak_flops: float | None = None, window_size: int = 50) -> None:
        super().__init__(_batch_size, _batch_tokens, window_size=window_size, separator="/")
        self.peak_flops = peak_flops

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self.peak_flops:
            self.available_flops = int(self.peak_flops)
            for throughput in self._throughputs.values():
                throughput.available_flops = self.available_flops

    @rank_zero_only
    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: object,
        batch: object,
        *args,
        **kwargs,
    ) -> None:
        # Time validation (so that it is kept out of training throughput) but do not log it:
        # Lightning logs it with the validation loop's batch index as the step, which would
        # interleave with the training steps in every log.
        if not trainer.sanity_checking:
            self._update(trainer, pl_module, batch, trainer._evaluation_loop.batch_progress.total.ready)


class SampleText(L.Callback):
    """Every N optimizer steps, generate a short text from the model being trained and write it to
    <run dir>/samples.txt and to any logger with a `log_text` (wandb's text table).

    Sampling uses its own seeded generator: the training run's random streams are untouched.
    """

    def __init__(
        self,
        every_n_steps: int = 500,
        prompt: str = "\n",
        max_new_tokens: int = 200,
        sampling: SamplingConfig | Mapping[str, Any] | None = None,
        seed: int = 0,
    ) -> None:
        self.every_n_steps, self.prompt, self.max_new_tokens = every_n_steps, prompt, max_new_tokens
        # From conf/ a plain mapping (no _target_ for a dataclass), checked like generate.py's keys.
        mapping = isinstance(sampling, Mapping)
        self.sampling = sampling_config(None, **sampling) if mapping else sampling_config(sampling)
        self.seed = seed

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: object) -> None:
        step = trainer.global_step
        if (
            self.every_n_steps <= 0
            or step == 0
            or step % self.every_n_steps
            or trainer.fit_loop._should_accumulate()
        ):
            return
        if trainer.is_global_zero:
            self.write(trainer, step, self.sample(pl_module))

    def sample(self, pl_module: L.LightningModule) -> str:
        model = pl_module.model
        was_training = model.training
        # A model trained on pairs is prompted as it is taught, with its template (as generate.py does).
        fmt = getattr(pl_module, "hparams", {}).get("data_format")
        prompt = format_prompt(fmt, self.prompt) if fmt else self.prompt
        model.eval()
        try:
            text = generate_text(
                model,
                pl_module.tokenizer,
                prompt,
                self.max_new_tokens,
                sampling=self.sampling,
                seed=self.seed,
            )
        finally:
            model.train(was_training)
        return prompt + text

    @staticmethod
    def write(trainer: L.Trainer, step: int, text: str) -> None:
        with open(Path(trainer.default_root_dir) / "samples.txt", "a", encoding="utf-8") as f:
            f.write(f"=== step {step}\n{text}\n")
        for logger in trainer.loggers:
            if hasattr(logger, "log_text"):
                logger.log_text(key="samples", columns=["step", "text"], data=[[step, text]], step=step)


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


class EvaluateGenerations(L.Callback):
    """Every N optimizer steps and when training ends, generate completions of `limit` prompt ->
    completion pairs with each decoding method and log their scores (gpt.evaluate) as
    eval/<method>/<metric> to every logger; each example's outputs go to
    <run dir>/evals/step-N.jsonl.

    The examples: the pairs file `path` (read with `template` and `fields`, by default the training
    data's), else the run's held-out val examples when it trains on pairs; with neither, it says so
    once and does nothing. every_n_steps None (or 0) turns it off.

    Rank zero generates, alone, while the other ranks wait at a barrier: under DDP each rank holds
    the whole model. Under FSDP no rank does (generating would wait forever for the others' shards),
    so there it says so once and does nothing.
    """

    def __init__(
        self,
        every_n_steps: int | None = None,
        path: str | None = None,
        limit: int | None = 64,
        template: str | None = None,
        fields: Mapping[str, str] | None = None,
        decoding: DecodeConfig | Mapping[str, Any] | None = None,
    ) -> None:
        if every_n_steps is not None and every_n_steps < 0:
            raise ValueError(f"callbacks.evaluate.every_n_steps={every_n_steps} must be >= 1 (or null: off)")
        if limit is not None and limit < 1:
            raise ValueError(f"callbacks.evaluate.limit={limit} must be >= 1 (or null: all)")
        self.every_n_steps, self.path, self.limit = every_n_steps or None, path or None, limit
        if self.every_n_steps and self.path and not Path(self.path).expanduser().exists():
            # Before training starts: its rows are read (with the training data's template) at fit start.
            raise UserError(
                f"callbacks.evaluate.path={self.path} does not exist; pass a .jsonl file of prompt -> "
                "completion pairs"
            )
        self.template, self.fields = template, dict(fields) if fields is not None else None
        # From conf/ a plain mapping, checked as evaluate.py's keys are.
        mapping = isinstance(decoding, Mapping)
        self.decoding = DecodeConfig(**decoding) if mapping else decoding or DecodeConfig()
        self.examples: list[EvalExample] = []
        self._last_step: int | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.examples, self._last_step = [], None
        if self.every_n_steps is None:
            return
        if isinstance(trainer.strategy, FSDPStrategy):
            _report("callbacks.evaluate: off under FSDP, where no rank holds the whole model to generate")
            return
        # Every rank reads them, so that a bad file stops every rank alike.
        examples = self.read(trainer, pl_module)
        if examples is None:
            _report(
                "callbacks.evaluate: no examples to evaluate (callbacks.evaluate.path is null and the "
                "training data has no held-out pairs); evaluation is off"
            )
            return
        self.examples = examples
        where = self.path or "the held-out val examples"
        _report(
            f"callbacks.evaluate: {len(examples)} examples of {where}, every {self.every_n_steps} steps "
            f"and at the end, {', '.join(self.decoding.methods)}"
        )

    def data_config(self, trainer: L.Trainer) -> DataConfig | None:
        """The training data's config, when it is pairs."""
        cfg = getattr(trainer.datamodule, "cfg", None)
        return cfg if isinstance(cfg, DataConfig) and cfg.source == "pairs" else None

    def prompt_template(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Template:
        """`template`, else the module's saved data_format, else the training data's, else plain."""
        if self.template:
            return get_template(self.template)
        fmt = getattr(pl_module, "hparams", {}).get("data_format")
        if isinstance(fmt, Mapping):
            return template_of(dict(fmt))
        data = self.data_config(trainer)
        return get_template(data.template if data is not None else "plain")

    def read(self, trainer: L.Trainer, pl_module: L.LightningModule) -> list[EvalExample] | None:
        if self.path is None:
            examples = held_out_examples(trainer.datamodule)
            return None if examples is None else examples[: self.limit]
        data = self.data_config(trainer)
        fields = self.fields if self.fields is not None else (data.fields if data is not None else {})
        cfg = DataConfig(source="pairs", path=self.path, fields=fields)
        rows = read_examples(cfg, find_files(cfg), self.prompt_template(trainer, pl_module))
        return encode_examples(islice(rows, self.limit), pl_module.tokenizer)

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
        if trainer.is_global_zero:
            metrics, records = evaluate(pl_module.model, pl_module.tokenizer, self.examples, self.decoding)
            flat = {f"eval/{m}/{k}": value for m, scores in metrics.items() for k, value in scores.items()}
            # Straight to the loggers, as lit_module logs train/ metrics: at this step, on every logger.
            for logger in trainer.loggers:
                logger.log_metrics(flat, step=step)
            write_jsonl(Path(trainer.default_root_dir) / "evals" / f"step-{step}.jsonl", records)
            _report(
                f"evaluation at step {step}: "
                + "; ".join(
                    f"{m} " + ", ".join(f"{name} {value:.2f}" for name, value in scores.items())
                    for m, scores in metrics.items()
                )
            )
        trainer.strategy.barrier("callbacks.evaluate")


class RunReport(L.Callback):
    """A line per validation and a summary when fit ends normally, logged: on the console and in
    <run dir>/train.log (Hydra's job logging), where the progress bar shows validation results only
    until its next refresh. Rank zero only. No summary after an exception or SIGTERM: Lightning
    calls on_fit_end only when fit returns.

    Values are read, not recomputed: validation metrics from trainer.callback_metrics, the best
    loss and the checkpoint paths from the checkpoint callbacks, tokens from the module's count.
    """

    def __init__(self, monitor: str = "val/loss") -> None:
        self.monitor = monitor
        self._started = time.monotonic()
        self._start_step: int | None = None
        self._last_validation_step: int | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._started, self._start_step = time.monotonic(), None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Not on_fit_start: a resumed run's step is restored after it. Not called at all when the
        # run had already reached max_steps.
        self._start_step = trainer.global_step

    @rank_zero_only
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self._last_validation_step = trainer.global_step
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        _report(
            f"validation at step {trainer.global_step}: "
            + ", ".join(f"{name} {value:.4f}" for name, value in metrics.items())
        )

    @rank_zero_only
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        _report("\n  ".join(self.summary(trainer, pl_module)))

    def summary(self, trainer: L.Trainer, pl_module: L.LightningModule) -> list[str]:
        step = trainer.global_step
        start = step if self._start_step is None else self._start_step
        resumed = f" (resumed at step {start})" if start else ""
        tokens = getattr(pl_module, "tokens_seen", 0)
        lines = [
            f"training finished at step {step}: {step - start} steps{resumed} in "
            f"{time.monotonic() - self._started:.1f} s, {tokens:,} training tokens"
        ]
        checkpoints = trainer.checkpoint_callbacks
        best = next((c for c in checkpoints if getattr(c, "monitor", None) == self.monitor), None)
        scores = []
        final = trainer.callback_metrics.get(self.monitor)
        if final is not None and self._last_validation_step is not None:
            scores.append(f"final {self.monitor} {float(final):.4f} at step {self._last_validation_step}")
        if best is not None and best.best_model_score is not None:
            best_step = saved_step(best.best_model_path)
            at = f" at step {best_step}" if best_step is not None else ""
            scores.append(f"best {float(best.best_model_score):.4f}{at}")
        if scores:
            lines.append(", ".join(scores))
        last = next((c.last_model_path for c in checkpoints if getattr(c, "last_model_path", "")), "")
        if last:
            lines.append(f"last checkpoint: {last}")
        if best is not None and best.best_model_path:
            lines.append(f"best checkpoint: {best.best_model_path}")
        return lines


def _report(message: str) -> None:
    """Log at INFO; print where logging is not set up (no handler would show it): outside Hydra,
    or in the processes ddp_spawn starts."""
    if log.isEnabledFor(logging.INFO) and log.hasHandlers():
        log.info(message)
    else:
        print(message)
