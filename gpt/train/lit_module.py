"""GPTLitModule: the training "system" around the network: loss, metrics, optimizer, schedule.

Two kinds of batch. Text: a tuple (x, y) of (B, T) windows, the loss the mean over every token;
with data.doc_mask (x, y, positions, segments), each document of a window attending only to itself.
Examples (prompt -> completion pairs): a dict of (B, T) tensors "idx", "targets" (IGNORE = no
loss: prompt tokens, padding), "positions", "segments" (several examples packed into a row, padding
-1), "prefix" (the prompt tokens, for a prefix LM), and "step_tokens" (B,): the counted targets of
the whole optimizer step, over its micro-batches and ranks. Each micro-batch's loss is its summed
cross-entropy scaled so that, after Lightning divides by accumulate_grad_batches and DDP averages
over ranks, the step's gradient is that of the mean over the step's completion tokens: a token
weighs the same whichever micro-batch or rank it falls in.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict
from typing import Any

import lightning as L
import numpy as np
import torch

try:  # FSDP2's public home since torch 2.6; trainer=fsdp2 needs it, nothing else does
    from torch.distributed.fsdp import FSDPModule, fully_shard
except ImportError:  # pragma: no cover
    FSDPModule = fully_shard = None
from torchmetrics import MeanMetric, SumMetric

from gpt.config import DataConfig, ModelConfig, OptimConfig
from gpt.data.pairs_datamodule import IGNORE
from gpt.errors import ConfigError, NonFiniteError
from gpt.model.encoder_decoder import build_model
from gpt.model.loss import cross_entropy_per_token, fused_linear_cross_entropy
from gpt.tokenizer import Tokenizer, token_byte_lengths, tokenizer_from_dict
from gpt.train.optim import build_optimizer, build_scheduler

Batch = tuple[torch.Tensor, ...] | dict[str, torch.Tensor]


def get_rng_state() -> dict[str, Any]:
    """Every random stream training draws from, as plain data (loads with weights_only=True)."""
    np_state = np.random.get_state(legacy=False)
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": "MT19937",
            "state": {"key": n["key"].numpy().astype(np.uint32), "pos": n["pos"]},
            "has_gauss": n["has_gauss"],
            "gauss": n["gauss"],
        }
    )
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class GPTLitModule(L.LightningModule):
    """Hyperparameters are saved as plain dicts (model, optim, tokenizer), so a checkpoint loads with
    torch.load(weights_only=True) and gpt.runs.checkpoint rebuilds the model without Lightning. The
    tokenizer dict is that stored form; the module keeps the tokenizer itself as `tokenizer`.
    data_format: how the training prompts were written (gpt.data.pairs.data_format), so that
    generation formats a prompt the same way; None for text. data: the training data config (its
    val_windows resolved), so that evaluate task=bpb scores the windows validation scored."""

    def __init__(
        self,
        model: dict[str, Any],
        optim: dict[str, Any],
        tokenizer: dict[str, Any],
        data_format: dict[str, Any] | None = None,
        data: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model_config = ModelConfig(**model)
        self.optim_config = OptimConfig(**optim)
        self.model = build_model(self.model_config)  # GPT, or EncoderDecoder for model.arch=encoder_decoder
        self.tokenizer = tokenizer_from_dict(tokenizer)
        self.register_buffer(
            "token_bytes", token_byte_lengths(self.tokenizer, self.model_config.vocab_size), persistent=False
        )
        # Over the micro-batches (and ranks) of one optimizer step. No NaN check: it would read the
        # value back every micro-batch (a host-device sync), and NonFiniteGuard checks it anyway.
        self.train_loss = MeanMetric(nan_strategy="disable")
        # Validation sums, reduced over ranks by torchmetrics: loss = nats / tokens over every counted
        # target; bpb = text_nats / bytes over the targets that are text (end-of-text has no bytes).
        self.val_nats = SumMetric()
        self.val_tokens = SumMetric()
        self.val_text_nats = SumMetric()
        self.val_bytes = SumMetric()
        self.tokens_seen = 0  # training tokens over all ranks, restored on resume
        # Example batches: this rank's non-padding tokens since the last optimizer step, a tensor
        # (no device sync per micro-batch), summed over ranks once per step into _counted_tokens,
        # still on the device; tokens_seen reads it only when asked (logging steps, checkpoints).
        self._pending_tokens: torch.Tensor | None = None
        self._counted_tokens: torch.Tensor | None = None
        self._n_params = self.model.num_params()
        # What the progress bar (gpt.train.callbacks.ProgressBar) shows: Python numbers, set on logging steps.
        self.bar_metrics: dict[str, float] = {}
        self._batch_shape = (0, 0)  # (B, T) of the last batch, for flops_per_batch

    def configure_model(self) -> None:
        """Under FullyShardedStrategy (FSDP2), shard each transformer block as its own unit, then
        the rest (embeddings, final norm, tied head). Other strategies give no device mesh."""
        mesh = self._device_mesh
        if mesh is None or (FSDPModule is not None and isinstance(self.model, FSDPModule)):
            return
        if fully_shard is None:
            raise ConfigError(
                f"trainer=fsdp2 needs torch 2.6 or newer (FSDP2); this is torch {torch.__version__}"
            )
        for block in (*getattr(self.model, "enc_h", ()), *self.model.h):
            fully_shard(block, mesh=mesh["data_parallel"])
        fully_shard(self.model, mesh=mesh["data_parallel"])

    @classmethod
    def from_configs(
        cls,
        model: ModelConfig,
        optim: OptimConfig,
        tokenizer: Tokenizer,
        data_format: dict[str, Any] | None = None,
        data: DataConfig | None = None,
    ) -> GPTLitModule:
        return cls(
            asdict(model),
            asdict(optim),
            tokenizer.to_dict(),
            data_format,
            None if data is None else asdict(data),
        )

    @property
    def flops_per_batch(self) -> float:
        """FLOPs of the last batch on this device (read by the Throughput callback for MFU).

        The usual estimate (Kaplan et al. 2020; PaLM appendix B): 6 N per token for the weight
        matmuls forward and backward plus 12 L T C for attention scores and values, and a third of
        both without a backward pass (validation).
        """
        c = self.model_config
        per_token = 6 * self._n_params + 12 * c.n_layer * c.n_embd * self._batch_shape[1]
        if not self.training:
            per_token /= 3
        return per_token * self._batch_shape[0] * self._batch_shape[1]

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(idx)

    def hidden_and_targets(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's final hidden states (B, T, C) on a text or example batch, and its targets (B, T).
        The losses apply lm_head chunk by chunk (gpt.model.loss): no (B, T, V) logits are held."""
        if isinstance(batch, dict):
            x, targets = batch["idx"], batch["targets"]
            # A decoder's rows have a "prefix"; an encoder-decoder's a "source" side instead.
            sides = {k: v for k, v in batch.items() if k == "prefix" or k.startswith("source")}
            hidden = self.model(
                x, positions=batch["positions"], segments=batch["segments"], return_hidden=True, **sides
            )
        else:  # (x, y), or with data.doc_mask (x, y, positions, segments)
            x, targets, *documents = batch
            positions, segments = documents or (None, None)
            hidden = self.model(x, positions=positions, segments=segments, return_hidden=True)
        self._batch_shape = tuple(x.shape)
        return hidden, targets

    def loss(self, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """A text batch's mean cross-entropy."""
        hidden, y = self.hidden_and_targets(batch)
        nats = fused_linear_cross_entropy(
            hidden.flatten(0, 1),
            self.model.lm_head.weight,
            y.flatten(),
            softcap=self.model.config.logit_softcap,
        )
        return nats / y.numel()

    def summed_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """An example batch's cross-entropy summed over its counted targets (fp32), in nats."""
        hidden, targets = self.hidden_and_targets(batch)
        return fused_linear_cross_entropy(
            hidden.flatten(0, 1),
            self.model.lm_head.weight,
            targets.flatten(),
            ignore_index=IGNORE,
            softcap=self.model.config.logit_softcap,
        )

    def step_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """An example micro-batch's share of the step's mean over its counted targets, scaled up by
        world_size * accumulate_grad_batches, which Lightning's and DDP's averaging divide out."""
        scale = self.trainer.world_size * self.trainer.accumulate_grad_batches
        step_tokens = batch["step_tokens"][0].clamp(min=1)  # a step with no target: loss 0, not NaN
        return self.summed_loss(batch) * scale / step_tokens

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        if isinstance(batch, dict):
            loss = self.step_loss(batch)
            tokens = (batch["segments"] >= 0).sum()
            if "source_segments" in batch:  # an encoder-decoder's source tokens count too
                tokens = tokens + (batch["source_segments"] >= 0).sum()
            self._pending_tokens = tokens if self._pending_tokens is None else self._pending_tokens + tokens
        else:
            loss = self.loss(batch)
            self._tokens_seen += batch[1].numel() * self.trainer.world_size
        # The mean over the step's micro-batches and ranks: for examples, the mean over the step's
        # counted targets (the scale above times the number of means cancels).
        self.train_loss.update(loss.detach())
        return loss

    @property
    def tokens_seen(self) -> int:
        """Training tokens over all ranks (reading it waits for the device when examples were counted)."""
        if self._counted_tokens is not None:
            self._tokens_seen += int(self._counted_tokens)
            self._counted_tokens = None
        return self._tokens_seen

    @tokens_seen.setter
    def tokens_seen(self, value: int) -> None:
        self._tokens_seen, self._counted_tokens = value, None

    def count_pending_tokens(self) -> None:
        """Add the example tokens of this step, over all ranks, to the count, on the device."""
        if self._pending_tokens is None:
            return
        tokens, self._pending_tokens = self._pending_tokens, None
        if self.trainer.world_size > 1:  # an all-reduce the host does not wait for
            tokens = self.trainer.strategy.reduce(tokens, reduce_op="sum")
        self._counted_tokens = tokens if self._counted_tokens is None else self._counted_tokens + tokens

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # Once per optimizer step, after accumulation (and unscaling under 16-mixed), before clipping.
        self.count_pending_tokens()
        step = self.global_step
        if (step + 1) % self.trainer.log_every_n_steps == 0:
            loss = self.train_loss.compute()  # mean over this step's micro-batches and ranks
            grads = [p.grad for p in self.parameters() if p.grad is not None]
            metrics = {
                "train/loss": loss.item(),
                "train/grad_norm": torch.nn.utils.get_total_norm(grads).item(),
                "train/tokens": float(self.tokens_seen),
            }
            # Straight to the loggers: Lightning writes self.log values after the step's checkpoint
            # callbacks, so a kill between the two would lose this step from the log for good.
            for logger in self.loggers:
                logger.log_metrics(metrics, step=step)
            # Not self.log(prog_bar=True): Lightning would keep the tensor and read it again (.item(), a
            # host-device sync) after every batch until the next logging step; this is a number already.
            self.bar_metrics = {"loss": metrics["train/loss"]}
        self.train_loss.reset()

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        # Over the counted targets (all of a text batch's; example batches: not IGNORE): their nats and
        # number; and, for bits per byte, the nats and UTF-8 bytes of those that are text.
        hidden, targets = self.hidden_and_targets(batch)
        nats = cross_entropy_per_token(
            hidden.flatten(0, 1),
            self.model.lm_head.weight,
            targets.flatten(),
            ignore_index=IGNORE,
            softcap=self.model.config.logit_softcap,
        )  # (B * T,), 0 where IGNORE
        counted = targets.flatten() != IGNORE
        n_bytes = self.token_bytes[targets.flatten().clamp(min=0)] * counted
        self.val_nats.update(nats.sum())
        self.val_tokens.update(counted.sum())
        self.val_text_nats.update(nats[n_bytes > 0].sum())
        self.val_bytes.update(n_bytes.sum())

    def on_validation_epoch_end(self) -> None:
        metrics = (self.val_nats, self.val_tokens, self.val_text_nats, self.val_bytes)
        nats, tokens, text_nats, n_bytes = (metric.compute() for metric in metrics)
        for metric in metrics:
            metric.reset()
        loss = nats / tokens
        bpb = text_nats / (math.log(2) * n_bytes)
        # compute() already reduced over ranks; sync_dist only states that the value is global.
        self.log_dict(
            {"val/loss": loss, "val/ppl": torch.exp(loss), "val/bpb": bpb}, prog_bar=True, sync_dist=True
        )

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = build_optimizer(self.model, self.optim_config)
        total = (
            self.trainer.max_steps if self.trainer.max_steps > 0 else self.trainer.estimated_stepping_batches
        )
        scheduler = build_scheduler(optimizer, self.optim_config, int(total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # No checkpoint (last, best, periodic) ever holds a non-finite model. The NonFiniteGuard
        # callback stops before one exists; this catches runs without it.
        bad = [name for name, p in self.named_parameters() if not torch.isfinite(p).all()]
        if bad:
            raise NonFiniteError(
                f"the weights are non-finite at step {self.global_step} ({bad[0]} and {len(bad) - 1} more); "
                "refusing to save them. Resume from an earlier checkpoint with a lower optim.lr"
            )
        # Lightning saves weights, optimizer, schedule and loop progress, not random streams: with
        # these and the data position (GPTDataModule.state_dict) a resumed run is bit-identical.
        checkpoint["rng"] = get_rng_state()
        checkpoint["tokens_seen"] = self.tokens_seen

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "rng" in checkpoint:
            set_rng_state(checkpoint["rng"])
        self.tokens_seen = checkpoint.get("tokens_seen", 0)
