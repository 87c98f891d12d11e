"""ProgressBar: Lightning's TQDM bar with the training loss read on logging steps only, 4 decimals,
drawn only on a terminal."""

from __future__ import annotations

import math
import sys
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar


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
