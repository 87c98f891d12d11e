"""GPTLitModule: the training "system" around the network: loss, metrics, optimizer, schedule."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric

from gpt.config import ModelConfig, OptimConfig
from gpt.model import GPT
from gpt.optim import build_optimizer, build_scheduler


class GPTLitModule(L.LightningModule):
    """Hyperparameters are saved as plain dicts (model, optim, tokenizer), so a checkpoint loads with
    torch.load(weights_only=True) and gpt.checkpoint rebuilds the model without Lightning."""

    def __init__(self, model: dict[str, Any], optim: dict[str, Any], tokenizer: dict[str, Any]) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model_config = ModelConfig(**model)
        self.optim_config = OptimConfig(**optim)
        self.model = GPT(self.model_config)
        self.val_loss = MeanMetric()

    @classmethod
    def from_configs(cls, model: ModelConfig, optim: OptimConfig, tokenizer: dict[str, Any]) -> GPTLitModule:
        return cls(asdict(model), asdict(optim), tokenizer)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(idx)

    def loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        logits = self.model(x)  # (B, T, V)
        return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.loss(batch)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        # Weighted by tokens, so a short last batch counts for what it holds.
        self.val_loss.update(self.loss(batch), weight=batch[1].numel())

    def on_validation_epoch_end(self) -> None:
        loss = self.val_loss.compute()
        self.val_loss.reset()
        # compute() already reduced over ranks; sync_dist only states that the value is global.
        self.log_dict({"val/loss": loss, "val/ppl": torch.exp(loss)}, prog_bar=True, sync_dist=True)

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = build_optimizer(self.model, self.optim_config)
        total = (
            self.trainer.max_steps if self.trainer.max_steps > 0 else self.trainer.estimated_stepping_batches
        )
        scheduler = build_scheduler(optimizer, self.optim_config, int(total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
