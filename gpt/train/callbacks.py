"""Callbacks Lightning does not ship: validate on the last step, stop on non-finite values, throughput,
text samples, evaluation tasks (generation, HellaSwag, multiple choice, bits per byte), the run report,
a progress bar that reads no tensor between logging steps and is drawn only on a terminal, and a plain
model summary."""

from __future__ import annotations

import logging
import math
import sys
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from itertools import islice
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelSummary as LightningModelSummary
from lightning.pytorch.callbacks import ThroughputMonitor, TQDMProgressBar
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from lightning.pytorch.utilities.model_summary.model_summary import _format_summary_table  # ModelSummary's
from torch.distributed.tensor import DTensor
from torchmetrics import Metric

from gpt.config import BPB_WINDOWS, EVAL_TASKS, DataConfig, DecodeConfig, SamplingConfig, sampling_config
from gpt.data.pairs import PreparedPairs, Template, format_prompt, get_template, read_examples, template_of
from gpt.data.sources import data_root, find_files
from gpt.errors import ConfigError, NonFiniteError, UserError
from gpt.evaluate.bpb import bpb_data, bpb_metrics, bpb_windows, score_bpb
from gpt.evaluate.choice import (
    choice_metrics,
    choice_sums,
    encode_choices,
    hellaswag_file,
    read_choices,
    read_hellaswag,
    score_choices,
)
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

    Stopping raises NonFiniteError naming the step where the loss or gradient first went
    non-finite, with the weights as they were before that step, and before any checkpoint of a
    later step is written; the message names the newest checkpoint. Skipping drops the step's
    update (every weight and its optimizer state stay as they were; the LR schedule moves on) and
    stops after `max_skips` skipped steps in a row, since then it is the weights, not a batch,
    that are bad. Under 16-mixed, GradScaler already skips steps with inf/NaN gradients and lowers
    its scale, so only the loss is checked there.

    No host-device sync per step where the optimizer can skip an update on the device: fused
    AdamW (the default on GPU) and optim=muon with fused AdamW (gpt.train.optim.Muon skips on the
    device too) take a `found_inf` flag as GradScaler passes it; so does the scaler itself under
    16-mixed. The flags stay on the device, all-reduced so that every rank decides the same, and
    are read on logging steps, before any checkpoint is saved and when training ends. Once stopping
    is decided on the device, every later update is skipped there too until the flags are read.
    An optimizer that cannot skip on the device, unfused AdamW (the default on CPU, where a read
    costs nothing to wait for) and so optim=muon on CPU, reads the flag every step, as a skip then
    has to drop the gradients on the host.
    """

    # Fields of the device-side state, one int64 tensor read in one go.
    RUN, STOP_STEP, STOP_WHAT, FIRST_SKIP, FIRST_WHAT, SKIPS, LAST_SKIP = range(7)
    WHAT = {1: "gradient", 2: "loss"}

    def __init__(self, action: str = "stop", max_skips: int = 10) -> None:
        if action not in ("stop", "skip"):
            raise ValueError(f"callbacks.nonfinite.action={action!r}: use stop or skip")
        self.action, self.max_skips = action, max_skips
        self._loss_bad: torch.Tensor | None = None
        self._state: torch.Tensor | None = None
        self._optimizer: torch.optim.Optimizer | None = None

    def on_before_backward(
        self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor
    ) -> None:
        bad = ~torch.isfinite(loss.detach())
        self._loss_bad = bad if self._loss_bad is None else self._loss_bad | bad

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        loss_bad, self._loss_bad = self._loss_bad, None
        device = pl_module.device
        if loss_bad is None:
            loss_bad = torch.zeros((), dtype=torch.bool, device=device)
        grad_bad = torch.zeros((), dtype=torch.bool, device=device)
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is None:
            grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
            norm = torch.nn.utils.get_total_norm(grads)
            if isinstance(norm, DTensor):  # FSDP2's sharded gradients: the norm over every shard
                norm = norm.full_tensor()
            grad_bad = ~torch.isfinite(norm)
        # 2: the loss, 1: only the gradient, 0: finite; the max over ranks, reduced without reading it.
        what = torch.where(loss_bad, 2, torch.where(grad_bad, 1, 0)).to(device)
        if trainer.world_size > 1:
            what = trainer.strategy.reduce(what.float(), reduce_op="max").long()
        bad = what > 0
        on_device = scaler is not None or getattr(optimizer, "_step_supports_amp_scaling", False)
        if not on_device:
            self._step_on_host(trainer, pl_module, bool(bad), self.WHAT.get(int(what), ""))
            return
        self._record(trainer.global_step, bad, what)
        if scaler is None:
            # Fused AdamW skips the whole update (weights, moments, step count) where found_inf is 1.
            stopped = self._state[self.STOP_STEP] >= 0
            optimizer.found_inf = (bad | stopped).float()
            optimizer.grad_scale = None
            self._optimizer = optimizer

    def _record(self, step: int, bad: torch.Tensor, what: torch.Tensor) -> None:
        """Update the device-side state with this step's flag; nothing is read."""
        if self._state is None:
            self._state = torch.tensor([0, -1, 0, -1, 0, 0, -1], dtype=torch.long, device=bad.device)
        s = self._state
        run = torch.where(bad, s[self.RUN] + 1, 0)
        limit = 0 if self.action == "stop" else self.max_skips
        stop_now = (run > limit) & (s[self.STOP_STEP] < 0)
        skip = bad & ~stop_now & (s[self.STOP_STEP] < 0)
        first = skip & (s[self.FIRST_SKIP] < 0)
        self._state = torch.stack(
            [
                run,
                torch.where(stop_now, step, s[self.STOP_STEP]),
                torch.where(stop_now, what, s[self.STOP_WHAT]),
                torch.where(first, step, s[self.FIRST_SKIP]),
                torch.where(first, what, s[self.FIRST_WHAT]),
                s[self.SKIPS] + skip.long(),
                torch.where(skip, step, s[self.LAST_SKIP]),
            ]
        )

    def _step_on_host(self, trainer: L.Trainer, pl_module: L.LightningModule, bad: bool, what: str) -> None:
        """The check for an optimizer that cannot skip on the device: decide now (one sync)."""
        step = trainer.global_step
        self._record(step, torch.tensor(bad), torch.tensor({"loss": 2, "gradient": 1}.get(what, 0)))
        if bad and self.action == "skip" and int(self._state[self.STOP_STEP]) < 0:
            for p in pl_module.parameters():
                p.grad = None
        self.check(trainer)

    def check(self, trainer: L.Trainer) -> None:
        """Read the device-side state (one sync): warn of skipped updates, raise once stopping."""
        if self._state is None:
            return
        s = self._state.tolist()
        if s[self.SKIPS]:
            first, what, n = s[self.FIRST_SKIP], self.WHAT[s[self.FIRST_WHAT]], s[self.SKIPS]
            more = f" (and {n - 1} more, the last at step {s[self.LAST_SKIP]})" if n > 1 else ""
            rank_zero_warn(f"step {first}: non-finite {what}, update skipped{more} (nonfinite.action=skip)")
            self._state[[self.FIRST_SKIP, self.SKIPS, self.LAST_SKIP]] = torch.tensor(
                [-1, 0, -1], device=self._state.device
            )
        if s[self.STOP_STEP] < 0:
            return
        step, what = s[self.STOP_STEP], self.WHAT[s[self.STOP_WHAT]]
        good = newest_checkpoint(trainer.default_root_dir)
        after = f" after {self.max_skips} skipped steps in a row" if self.action == "skip" else ""
        raise NonFiniteError(
            f"non-finite {what} at step {step}{after}; training stopped before updating the weights. "
            + (f"Last good checkpoint: {good}. " if good else "No checkpoint was saved yet. ")
            + "Try a lower optim.lr, more warmup or bf16 instead of 16-mixed, or skip such steps "
            "with callbacks.nonfinite.action=skip"
        )

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: object) -> None:
        if self._optimizer is not None:  # the step is done: the optimizer checks no flag of ours
            del self._optimizer.found_inf, self._optimizer.grad_scale
            self._optimizer = None
        if trainer.global_step % trainer.log_every_n_steps == 0 and not trainer.fit_loop._should_accumulate():
            self.check(trainer)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: Any) -> None:
        self.check(trainer)  # before the checkpoint is written

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.check(trainer)


class ProgressBar(TQDMProgressBar):
    """Lightning's TQDMProgressBar, plus the module's `bar_metrics` (GPTLitModule: the training loss),
    Python numbers the module sets on logging steps, and every number to 4 decimals, as RunReport's
    lines show them (tqdm's own format keeps 3 significant digits: loss=3.360).

    The training loss is not logged with self.log(prog_bar=True): Lightning keeps a value logged in
    a training hook and converts it to a number again after every batch until it is logged anew
    (logger_connector.on_batch_end -> _ResultCollection.metrics -> convert_tensors_to_scalars, an
    .item() on the device), even without a progress bar: one host-device sync per step.

    terminal_only: draw the bars only where they go to a terminal (Lightning's write to stdout).
    Redirected to a file or a pipe, every redraw would stay in it, with the cursor moves of the
    validation bar; RunReport's lines say what matters there.
    """

    def __init__(
        self,
        refresh_rate: int = 1,
        process_position: int = 0,
        leave: bool = False,
        terminal_only: bool = True,
    ) -> None:
        super().__init__(refresh_rate, process_position, leave)
        self.terminal_only = terminal_only

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self.terminal_only and not _is_terminal(sys.stdout):
            self.disable()

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        version = {"v_num": metrics.pop("v_num")} if "v_num" in metrics else {}
        metrics = {**version, **getattr(pl_module, "bar_metrics", {}), **metrics}
        return {name: _four_decimals(value) for name, value in metrics.items()}


def _four_decimals(value: Any) -> Any:
    # Integers (v_num) and strings as they are; NaN and inf as Lightning's bar writes them.
    return f"{value:.4f}" if isinstance(value, float) and math.isfinite(value) else value


def _is_terminal(stream: Any) -> bool:
    """Whether `stream` is a terminal (not a file, a pipe, a closed stream or None)."""
    try:
        return bool(stream is not None and stream.isatty())
    except (AttributeError, ValueError):  # no isatty (a stand-in object), or closed
        return False


class ModelSummary(LightningModelSummary):
    """Lightning's ModelSummary (the module's submodules to `max_depth`, their parameters), one plain
    table in the log, the same whether or not rich is installed: Lightning's default where it can
    import rich is RichModelSummary, a box table printed to the console only. Left out: the module's
    torchmetrics objects (running sums and means, no parameters) and the FLOPs column and total,
    which Lightning counts in a forward pass of the module's `example_input_array` only, so
    GPTLitModule's read 0 (Throughput logs the model's FLOP/s).

    train.py passes the Trainer enable_model_summary=False, so that Lightning adds no summary of its
    own, and leaves this callback out where the config sets trainer.enable_model_summary=false.
    """

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        metrics = {name: m for name, m in pl_module.named_modules() if isinstance(m, Metric)}
        self._metrics = set(metrics)
        self._metric_modes = Counter("train" if m.training else "eval" for m in metrics.values())
        super().on_fit_start(trainer, pl_module)

    def summarize(  # Lightning's is a staticmethod; it is called on the callback
        self,
        summary_data: list[tuple[str, list[str]]],
        total_parameters: int,
        trainable_parameters: int,
        model_size: float,
        total_training_modes: dict[str, int],
        total_flops: int,
        **summarize_kwargs: Any,
    ) -> None:
        rows = [i for i, name in enumerate(dict(summary_data)["Name"]) if name not in self._metrics]
        columns = [(title, [values[i] for i in rows]) for title, values in summary_data if title != "FLOPs"]
        if columns and columns[0][0] == " ":  # the row numbers: again from 0 (" " marks a leftover row)
            numbers = iter(range(len(rows)))
            columns[0] = (" ", [value if value == " " else str(next(numbers)) for value in columns[0][1]])
        modes = {mode: n - self._metric_modes[mode] for mode, n in total_training_modes.items()}
        table = _format_summary_table(total_parameters, trainable_parameters, model_size, modes, 0, *columns)
        log.info("\n".join(line.rstrip() for line in table.splitlines() if not line.endswith("Total Flops")))


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
        self._pending_flops: dict[Any, float] = {}  # by stage: FLOPs of the batches since the last timed one

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self.peak_flops:
            self.available_flops = int(self.peak_flops)
            for throughput in self._throughputs.values():
                throughput.available_flops = self.available_flops

    def _update(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, iter_num: int) -> None:
        # Lightning's waits for the device (torch.cuda.synchronize) after every batch. Here every
        # batch is counted on the host, but training batches are timed (so waited for) only on the
        # steps that are logged: the rates over the window are the same, from points further apart.
        stage = trainer.state.stage
        self._lengths[stage] += self.length_fn(batch)
        self._samples[stage] += self.batch_size_fn(batch)
        self._batches[stage] += 1
        flops = self._pending_flops.get(stage, 0.0) + getattr(pl_module, "flops_per_batch", 0)
        self._pending_flops[stage] = flops
        if stage == "train" and not trainer._logger_connector.should_update_logs:
            return
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()  # perf_counter() times the work queued so far
        self._throughputs[stage].update(
            time=time.perf_counter() - self._t0s[stage],
            batches=self._batches[stage],
            samples=self._samples[stage],
            lengths=self._lengths[stage],
            flops=flops,
        )
        self._pending_flops[stage] = 0.0

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

    The tasks, as evaluate.py runs them (docs/evaluation.md):
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
        template: str | None = None,
        fields: Mapping[str, str] | None = None,
        windows: str = "val",
        decoding: DecodeConfig | Mapping[str, Any] | None = None,
    ) -> None:
        if every_n_steps is not None and every_n_steps < 0:
            raise ValueError(f"callbacks.evaluate.every_n_steps={every_n_steps} must be >= 1 (or null: off)")
        if limit is not None and limit < 1:
            raise ValueError(f"callbacks.evaluate.limit={limit} must be >= 1 (or null: all)")
        if task not in EVAL_TASKS:
            raise ConfigError(f"callbacks.evaluate.task={task!r} is not one of {', '.join(EVAL_TASKS)}")
        if windows not in BPB_WINDOWS:
            raise ConfigError(
                f"callbacks.evaluate.windows={windows!r} is not one of {', '.join(BPB_WINDOWS)}"
            )
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
        self.template, self.fields = template, dict(fields) if fields is not None else None
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
                _report(line)
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
        """`template`, else the module's saved data_format, else the training data's, else plain."""
        if self.template:
            return get_template(self.template)
        fmt = getattr(pl_module, "hparams", {}).get("data_format")
        if isinstance(fmt, Mapping):
            return template_of(dict(fmt))
        data = self.data_config(datamodule)
        return get_template(data.template if data is not None else "plain")

    def read(self, datamodule: Any, pl_module: L.LightningModule) -> Sequence[Any] | None:
        """What the task scores: examples (generate, hellaswag, mc) or windows (bpb); None: nothing."""
        path = self.path
        if self.task in ("hellaswag", "mc"):
            file = Path(path).expanduser()
            examples = (
                read_hellaswag(file) if self.task == "hellaswag" else read_choices(file, self.fields or {})
            )
            for example in examples[: self.limit]:  # a row the model cannot score stops it here, not mid-run
                encode_choices(pl_module.tokenizer, example, pl_module.model.config.block_size)
            return examples[: self.limit]
        if self.task == "bpb":
            train_data = getattr(datamodule, "cfg", None)
            if path is None and not (isinstance(train_data, DataConfig) and train_data.source != "pairs"):
                return None
            data = bpb_data(DataConfig(source="text", path=path), None, Path(path)) if path else train_data
            return bpb_windows(
                data, pl_module.tokenizer, pl_module.model.config.block_size, self.windows, self.limit
            )
        if path is None:
            examples = held_out_examples(datamodule)
            return None if examples is None else examples[: self.limit]
        data = self.data_config(datamodule)
        fields = self.fields if self.fields is not None else (data.fields if data is not None else {})
        cfg = DataConfig(source="pairs", path=path, fields=fields)
        rows = read_examples(cfg, find_files(cfg), self.prompt_template(datamodule, pl_module))
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
        model, tokenizer = pl_module.model, pl_module.tokenizer
        if self.task == "generate":
            metrics = self.generate(trainer, pl_module, step)
        else:
            # This rank's share, then the sums over all ranks: every rank computes the same metrics.
            share = self.examples[trainer.global_rank :: trainer.world_size]
            was_training = model.training
            model.eval()
            try:
                if self.task == "bpb":
                    sums = score_bpb(model, tokenizer, share, self.decoding.batch_size)
                else:
                    sums = choice_sums(score_choices(model, tokenizer, share, self.decoding.batch_size))
            finally:
                model.train(was_training)
            names = sorted(sums)
            local = torch.tensor(
                [float(sums[k]) for k in names], dtype=torch.float64, device=pl_module.device
            )
            total = trainer.strategy.reduce(local, reduce_op="sum")
            sums = dict(zip(names, total.tolist(), strict=True))
            metrics = bpb_metrics(sums) if self.task == "bpb" else choice_metrics(sums)
        if trainer.is_global_zero:
            flat = {f"eval/{self.task}/{name}": value for name, value in metrics.items()}
            # Straight to the loggers, as lit_module logs train/ metrics: at this step, on every logger.
            for logger in trainer.loggers:
                logger.log_metrics(flat, step=step)
            shown = ", ".join(
                f"{name} {value:.{2 if self.task != 'bpb' else 4}f}" for name, value in metrics.items()
            )
            _report(f"evaluation ({self.task}) at step {step}: {shown}")

    def generate(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> dict[str, float]:
        """Rank zero generates and scores (the others wait): {method/metric: value} on rank zero."""
        flat: dict[str, float] = {}
        if trainer.is_global_zero:
            metrics, records = evaluate(pl_module.model, pl_module.tokenizer, self.examples, self.decoding)
            flat = {f"{m}/{k}": value for m, scores in metrics.items() for k, value in scores.items()}
            write_jsonl(Path(trainer.default_root_dir) / "evals" / f"step-{step}.jsonl", records)
        trainer.strategy.barrier("callbacks.evaluate")
        return flat


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
            f"{time.monotonic() - self._started:.1f} s (training and validation), {tokens:,} training tokens"
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
