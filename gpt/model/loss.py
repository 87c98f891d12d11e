"""Cross-entropy through the LM head without materialising the logits of the whole batch.

Why: the plain loss, F.cross_entropy(lm_head(hidden).float(), targets), holds fp32 logits of shape
(tokens, vocab) and, for the backward, their log-softmax and then their gradient. For model=medium at
16 x 1024 tokens x 50,257 vocab that is 3.3 GB per copy, more than the weights, the optimizer state
and often the activations together.

How: fused_linear_cross_entropy loops over chunks of tokens. For each chunk it computes the chunk's
logits (hidden_chunk @ weight.T, in the inputs' dtype, as nn.Linear would), their log-softmax in
fp32, the chunk's loss, and right away the gradients: dlogits = softmax - onehot (zero on ignored
rows), grad_hidden_chunk = dlogits @ weight and grad_weight += dlogits.T @ hidden_chunk (accumulated
in fp32). The chunk's logits are then dropped: the forward saves only grad_hidden and grad_weight,
and the backward multiplies them by grad_output. Peak memory holds one chunk's logits, not all.

The same idea as Liger-Kernel's fused linear cross-entropy (liger_kernel.ops.fused_linear_cross_entropy).
That package needs Triton and a GPU, so it cannot run on CPU or MPS; the idea is a few dozen lines of
plain PyTorch, written here by hand.
"""

from __future__ import annotations

import torch


def _chunk_nats(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, ...]:
    """logits (n, V) fp32 -> (nats (n,), 0 where ignored; log-normaliser (n,); counted (n,) bool)."""
    counted = targets != ignore_index
    lse = torch.logsumexp(logits, dim=-1)  # (n,)
    target_logit = logits.gather(1, targets.clamp(min=0)[:, None]).squeeze(1)  # (n,)
    return (lse - target_logit) * counted, lse, counted


def cross_entropy_per_token(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk_size: int = 4096,
    ignore_index: int = -100,
) -> torch.Tensor:
    """The nats of every token (N,), fp32, 0 where ignored, chunk by chunk; no gradient (evaluation)."""
    hidden, weight = _autocast_inputs(hidden, weight)
    out = []
    with torch.no_grad(), torch.autocast(hidden.device.type, enabled=False):
        for start in range(0, hidden.size(0), chunk_size):
            logits = (hidden[start : start + chunk_size] @ weight.T).float()  # (n, V)
            out.append(_chunk_nats(logits, targets[start : start + chunk_size], ignore_index)[0])
    return torch.cat(out) if out else hidden.new_zeros(0, dtype=torch.float32)


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size, ignore_index):
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_weight else None
        for start in range(0, hidden.size(0), chunk_size):
            h = hidden[start : start + chunk_size]  # (n, C)
            t = targets[start : start + chunk_size]  # (n,)
            logits = (h @ weight.T).float()  # (n, V), fp32 (a copy when the inputs are bf16/fp16)
            nats, lse, counted = _chunk_nats(logits, t, ignore_index)
            loss += nats.sum()
            if not (need_hidden or need_weight):
                continue
            dlogits = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
            dlogits[torch.arange(len(t), device=t.device), t.clamp(min=0)] -= 1.0  # - onehot
            dlogits *= counted[:, None]  # ignored rows get no gradient
            dlogits = dlogits.to(hidden.dtype)
            if need_hidden:
                grad_hidden[start : start + chunk_size] = dlogits @ weight
            if need_weight and grad_weight.dtype == h.dtype:
                grad_weight.addmm_(dlogits.T, h)  # in place: no (V, C) temporary per chunk
            elif need_weight:
                grad_weight += (dlogits.T @ h).float()
        ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype) if need_weight else None)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        # Scaled in place (a copy of grad_weight would be another (V, C) fp32 tensor), so the saved
        # gradients are spent: a second backward through the same loss would be wrong, so it fails.
        if getattr(ctx, "spent", False):
            raise RuntimeError("fused_linear_cross_entropy supports one backward per forward")
        ctx.spent = True
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden.mul_(grad_output.to(grad_hidden.dtype))
        if grad_weight is not None:
            grad_weight.mul_(grad_output.to(grad_weight.dtype))
        return grad_hidden, grad_weight, None, None, None


def _autocast_inputs(hidden: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Under autocast, cast both to the autocast dtype, as nn.Linear would (outside the Function, so
    autograd casts the gradients back to the parameters' dtype)."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        return hidden.to(dtype), weight.to(dtype)
    return hidden, weight


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk_size: int = 4096,
    ignore_index: int = -100,
) -> torch.Tensor:
    """F.cross_entropy(hidden @ weight.T, targets, reduction="sum", ignore_index=ignore_index), fp32,
    computed chunk_size tokens at a time.

    hidden (N, C), weight (V, C) (the LM head, possibly tied to the embedding), targets (N,) long.
    Returns the summed nats over the targets that are not ignore_index (0 when all are ignored); the
    mean is this divided by the number of counted targets.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    hidden, weight = _autocast_inputs(hidden, weight)
    if not (torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)):
        return cross_entropy_per_token(hidden, weight, targets, chunk_size, ignore_index).sum()
    with torch.autocast(hidden.device.type, enabled=False):
        return _FusedLinearCrossEntropy.apply(hidden, weight, targets, chunk_size, ignore_index)
