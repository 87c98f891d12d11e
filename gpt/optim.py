"""Parameter groups, optimizers, and learning-rate schedules as pure functions of the step."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn

from gpt.config import OptimConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices (linear weights, embeddings); never biases or norm gains (1-D tensors).

    Tied weights appear once: parameters() yields each tensor a single time.
    """
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def muon_split(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(hidden matrices for Muon, everything else): Muon is for the 2-D weights inside the blocks;
    embeddings, the LM head, norms and biases stay with AdamW (Jordan et al., 2024)."""
    hidden = {id(p) for name, p in model.named_parameters() if name.startswith("h.") and p.dim() == 2}
    params = [p for p in model.parameters() if p.requires_grad]
    return [p for p in params if id(p) in hidden], [p for p in params if id(p) not in hidden]


class MuonWithAdamW(torch.optim.Optimizer):
    """torch.optim.Muon for the hidden matrices and AdamW for the rest, stepped as one optimizer.

    Lightning's automatic optimization (accumulation, clipping, precision plugins) drives a single
    optimizer; this wrapper gives it one. Its param_groups are the inner optimizers' own group
    dicts, so a scheduler that sets a group's lr sets it where the step reads it.
    """

    def __init__(
        self, muon_params: list, adamw_groups: list[dict], muon: dict[str, Any], adamw: dict[str, Any]
    ):
        self.muon = torch.optim.Muon(muon_params, **muon)
        self.adamw = torch.optim.AdamW(adamw_groups, **adamw)
        super().__init__([p for g in self.adamw.param_groups for p in g["params"]] + list(muon_params), {})
        self.param_groups = self.muon.param_groups + self.adamw.param_groups

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001 (torch's signature)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.muon.step()
        self.adamw.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.muon.zero_grad(set_to_none)
        self.adamw.zero_grad(set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.muon.load_state_dict(state_dict["muon"])
        self.adamw.load_state_dict(state_dict["adamw"])
        self.param_groups = self.muon.param_groups + self.adamw.param_groups


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    fused = all(p.is_cuda for p in model.parameters()) or None
    adamw = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused)
    if cfg.name == "adamw":
        return torch.optim.AdamW(param_groups(model, cfg.weight_decay), **adamw)
    hidden, rest = muon_split(model)
    muon = dict(lr=cfg.muon_lr, momentum=cfg.muon_momentum, weight_decay=cfg.weight_decay)
    # The rest (embeddings, head, norms, biases) is not decayed under Muon, as in its reference runs.
    return MuonWithAdamW(hidden, [{"params": rest, "weight_decay": 0.0}], muon, adamw)


def lr_factor(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Multiplier of every group's lr at optimizer step `step` (0-based).

    Linear warmup from 1/warmup to 1, then
    - cosine: cosine decay to min_lr_ratio at the horizon (decay_steps or total_steps), flat after;
    - wsd: warmup-stable-decay: 1 until the last decay_fraction of the horizon, then linear to
      min_lr_ratio;
    - constant: 1.
    """
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    horizon = cfg.decay_steps or total_steps
    if cfg.schedule == "wsd":
        decay_start = max(cfg.warmup_steps, horizon - round(cfg.decay_fraction * horizon))
        if step < decay_start:
            return 1.0
        progress = min(1.0, (step - decay_start) / max(1, horizon - decay_start))
        return 1.0 - (1.0 - cfg.min_lr_ratio) * progress
    if horizon <= cfg.warmup_steps:
        return 1.0
    progress = min(1.0, (step - cfg.warmup_steps) / (horizon - cfg.warmup_steps))
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * cosine


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    # A closure (not a partial or a lambda object with state) keeps the scheduler's state_dict plain.
    def factor(step: int) -> float:
        return lr_factor(step, cfg, total_steps)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
