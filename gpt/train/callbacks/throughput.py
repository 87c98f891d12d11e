"""Throughput: tokens/s, FLOP/s and MFU of token batches, timed on logging steps only."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ThroughputMonitor
from lightning.pytorch.utilities import rank_zero_only


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
