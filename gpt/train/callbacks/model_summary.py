"""ModelSummary: Lightning's, as one plain table in the log, without metric objects and FLOPs."""

from __future__ import annotations

from collections import Counter
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelSummary as LightningModelSummary
from lightning.pytorch.utilities.model_summary.model_summary import _format_summary_table  # ModelSummary's
from torchmetrics import Metric

from gpt.train.callbacks.lines import log


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
