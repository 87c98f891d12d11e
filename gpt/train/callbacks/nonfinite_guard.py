"""NonFiniteGuard: a NaN or inf loss or gradient stops training, or skips that update."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.distributed.tensor import DTensor

from gpt.errors import NonFiniteError
from gpt.runs.checkpoint import newest_checkpoint


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
