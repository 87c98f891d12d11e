"""RunReport: a line per validation and a summary when fit ends, on the console and in train.log."""

from __future__ import annotations

import time

import lightning as L
from lightning.pytorch.utilities import rank_zero_only

from gpt.train.callbacks.lines import report
from gpt.train.checkpointing import saved_step


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
        report(
            f"validation at step {trainer.global_step}: "
            + ", ".join(f"{name} {value:.4f}" for name, value in metrics.items())
        )

    @rank_zero_only
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        report("\n  ".join(self.summary(trainer, pl_module)))

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
