"""Parameter groups, optimizers, and learning-rate schedules as pure functions of the step."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor

from gpt.config import OptimConfig
from gpt.train import precision

NS_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


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


def newton_schulz(
    g: torch.Tensor, coefficients: tuple[float, float, float], steps: int, eps: float, dtype: torch.dtype
) -> torch.Tensor:
    """Approximately orthogonalize the 2-D `g` (U S V^T -> about U V^T) by a quintic Newton-Schulz
    iteration computed in `dtype`; the result has that dtype and g's shape. A 3-D `g` is a stack of
    matrices of one shape, each orthogonalized on its own, in batched products (one call per product
    for the stack instead of one per matrix: what a small model's step spends its time on).

    The same operations as torch.optim.Muon's, which always computes in bf16: with
    dtype=torch.bfloat16 the result is bit for bit torch's (for a stack too: tested).
    """
    a, b, c = coefficients
    x = g.to(dtype, copy=True)  # a copy: the normalization below must not scale g in place
    tall = g.size(-2) > g.size(-1)
    if tall:
        x = x.mT  # iterate on the (short, wide) side with the smaller Gram matrix
    x.div_(torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True).clamp(min=eps))  # spectral <= 1
    addmm = torch.addmm if x.dim() == 2 else torch.baddbmm
    for _ in range(steps):
        gram = x @ x.mT
        poly = addmm(gram, gram, gram, beta=b, alpha=c)  # b*A + c*A@A
        x = addmm(x, poly, x, beta=a)  # a*X + (b*A + c*A@A) @ X
    return x.mT if tall else x


def muon_lr_ratio(adjust_lr_fn: str | None, shape: torch.Size) -> float:
    """Muon's per-matrix learning-rate multiplier, as torch.optim.Muon's adjust_lr_fn defines it."""
    rows, cols = shape[:2]
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    return math.sqrt(max(1, rows / cols))  # "original" (Keller Jordan's), the default


class Muon(torch.optim.Optimizer):
    """torch.optim.Muon with its Newton-Schulz iteration in `ns_dtype` instead of always bf16; the same
    state_dict, and bit for bit torch's with ns_dtype=torch.bfloat16. Where the tensor attribute
    `found_inf` is nonzero the step changes nothing; `grad_scale` divides the gradients first
    (docs/design.md, "Muon in our own step")."""

    _step_supports_amp_scaling = True

    def __init__(
        self,
        params,  # noqa: ANN001 (torch's ParamsT)
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_coefficients: tuple[float, float, float] = (3.4445, -4.7750, 2.0315),
        eps: float = 1e-7,
        ns_steps: int = 5,
        adjust_lr_fn: str | None = None,
        ns_dtype: torch.dtype = torch.bfloat16,
    ):
        if adjust_lr_fn not in (None, "original", "match_rms_adamw"):
            raise ValueError(f"adjust_lr_fn={adjust_lr_fn!r}: use None, 'original' or 'match_rms_adamw'")
        defaults = dict(
            lr=lr,
            weight_decay=weight_decay,
            momentum=momentum,
            nesterov=nesterov,
            ns_coefficients=ns_coefficients,
            eps=eps,
            ns_steps=ns_steps,
            adjust_lr_fn=adjust_lr_fn,
        )
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() != 2:
                    raise ValueError(f"Muon takes 2-D parameters only, got one of shape {tuple(p.shape)}")
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001 (torch's signature)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        skip = None if found_inf is None else found_inf > 0
        for group in self.param_groups:
            lr, momentum = float(group["lr"]), group["momentum"]
            by_shape: dict[torch.Size, list[tuple[torch.Tensor, ...]]] = {}  # one stacked iteration each
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad if grad_scale is None else p.grad / grad_scale
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
                buf = state["momentum_buffer"]
                # Where the step may be skipped, the new values are computed aside and kept only
                # where it is not: the same operations, so the same bits.
                new_buf = buf.lerp_(grad, 1 - momentum) if skip is None else buf.lerp(grad, 1 - momentum)
                update = grad.lerp(new_buf, momentum) if group["nesterov"] else new_buf
                by_shape.setdefault(p.shape, []).append((p, buf, new_buf, update))
            for shape, items in by_shape.items():
                updates = torch.stack([update for *_, update in items]) if len(items) > 1 else items[0][3]
                orthos = newton_schulz(
                    updates, group["ns_coefficients"], group["ns_steps"], group["eps"], self.ns_dtype
                )
                decay = 1 - lr * group["weight_decay"]  # decoupled weight decay, at the unadjusted lr
                alpha = -(lr * muon_lr_ratio(group["adjust_lr_fn"], shape))
                for (p, buf, new_buf, _), ortho in zip(
                    items, orthos if len(items) > 1 else [orthos], strict=True
                ):
                    if skip is None:
                        p.mul_(decay).add_(ortho, alpha=alpha)
                    else:
                        buf.copy_(torch.where(skip, buf, new_buf))
                        p.copy_(torch.where(skip, p, p.mul(decay).add_(ortho, alpha=alpha)))
        return loss


class MuonWithAdamW(torch.optim.Optimizer):
    """Muon for the hidden matrices and AdamW for the rest, stepped as one optimizer.

    Lightning's automatic optimization (accumulation, clipping, precision plugins) drives a single
    optimizer; this wrapper gives it one. Its param_groups are the inner optimizers' own group
    dicts, so a scheduler that sets a group's lr sets it where the step reads it.

    It skips a step on the device (GradScaler's and NonFiniteGuard's `found_inf`, see Muon) when
    its AdamW is fused, as it is on a GPU: Muon always can, unfused AdamW cannot. Not under FSDP2.
    """

    def __init__(
        self, muon_params: list, adamw_groups: list[dict], muon: dict[str, Any], adamw: dict[str, Any]
    ):
        self.muon = Muon(muon_params, **muon)
        self.adamw = torch.optim.AdamW(adamw_groups, **adamw)
        super().__init__([p for g in self.adamw.param_groups for p in g["params"]] + list(muon_params), {})
        self.param_groups = self.muon.param_groups + self.adamw.param_groups
        # Not under FSDP2 (sharded DTensor weights), where Muon's skip is untested: the flag is read.
        fused = getattr(self.adamw, "_step_supports_amp_scaling", False)
        self._step_supports_amp_scaling = fused and not any(isinstance(p, DTensor) for p in muon_params)

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001 (torch's signature)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # GradScaler and NonFiniteGuard set the flags on this optimizer; each inner one reads its own.
        flags = {name: getattr(self, name) for name in ("grad_scale", "found_inf") if hasattr(self, name)}
        for inner in (self.muon, self.adamw):
            for name, value in flags.items():
                setattr(inner, name, value)
        try:
            self.muon.step()
            self.adamw.step()
        finally:
            for inner in (self.muon, self.adamw):
                for name in flags:
                    delattr(inner, name)
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


def resolve_ns_dtype(requested: str, device: torch.device) -> torch.dtype:
    """optim.muon_ns_dtype as a dtype. auto: bf16 where `device` computes it fast, else fp32 (a CPU
    that emulates bf16 runs Muon's Newton-Schulz tens of times slower in bf16 than in fp32)."""
    if requested == "auto":
        return torch.bfloat16 if precision.bf16_speed(device.type).fast else torch.float32
    return NS_DTYPES[requested]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """Called from configure_optimizers, after Lightning moved the model to its device: "auto"
    dtypes are resolved for the device the parameters are on."""
    fused = all(p.is_cuda for p in model.parameters()) or None
    adamw = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused)
    if cfg.name == "adamw":
        return torch.optim.AdamW(param_groups(model, cfg.weight_decay), **adamw)
    hidden, rest = muon_split(model)
    ns_dtype = resolve_ns_dtype(cfg.muon_ns_dtype, hidden[0].device if hidden else torch.device("cpu"))
    muon = dict(lr=cfg.muon_lr, momentum=cfg.muon_momentum, weight_decay=cfg.weight_decay, ns_dtype=ns_dtype)
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
