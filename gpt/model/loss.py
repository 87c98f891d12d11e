"""Cross-entropy through the LM head chunk by chunk, without the (tokens, vocab) logits of the whole
batch: each chunk's logits, loss and gradients are computed in the forward and dropped
(docs/design.md, "The loss without the logits")."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gpt.model.autocast import autocast_inputs

# Logits elements per chunk (2**24: 64 MB in fp32). Smaller chunks save little more (the loop's
# transient is a few chunk-sized tensors) and, on a GPU, cost a few kernel launches each.
LOGITS_PER_CHUNK = 2**24


def default_chunk_size(vocab_size: int) -> int:
    """Tokens per chunk for a vocabulary: LOGITS_PER_CHUNK logits, at least one token."""
    return max(1, LOGITS_PER_CHUNK // vocab_size)


def soft_cap(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    """cap * tanh(logits / cap): logits bounded smoothly in (-cap, cap); unchanged when cap is None."""
    return logits if cap is None else cap * torch.tanh(logits / cap)


def _chunk_nats(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, ...]:
    """logits (n, V) fp32 -> (nats (n,), 0 where ignored; log-probabilities (n, V); counted (n,) bool).
    log_softmax, as F.cross_entropy computes it (on a CPU it is also 2 to 3 times faster than
    logsumexp, measured here on an AVX-512 machine)."""
    counted = targets != ignore_index
    logprobs = torch.log_softmax(logits, dim=-1)  # (n, V)
    target_logprob = logprobs.gather(1, targets.clamp(min=0)[:, None]).squeeze(1)  # (n,)
    return -target_logprob * counted, logprobs, counted


def cross_entropy_per_token(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk_size: int | None = None,
    ignore_index: int = -100,
    softcap: float | None = None,
) -> torch.Tensor:
    """The nats of every token (N,), fp32, 0 where ignored, chunk by chunk; no gradient (evaluation).
    softcap: the model's logit cap (soft_cap), applied to each chunk's logits."""
    hidden, weight = autocast_inputs(hidden, weight)
    chunk_size = chunk_size or default_chunk_size(weight.size(0))
    out = []
    with torch.no_grad(), torch.autocast(hidden.device.type, enabled=False):
        for start in range(0, hidden.size(0), chunk_size):
            logits = soft_cap((hidden[start : start + chunk_size] @ weight.T).float(), softcap)  # (n, V)
            out.append(_chunk_nats(logits, targets[start : start + chunk_size], ignore_index)[0])
    return torch.cat(out) if out else hidden.new_zeros(0, dtype=torch.float32)


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size, ignore_index, softcap):
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_weight else None
        for start in range(0, hidden.size(0), chunk_size):
            h = hidden[start : start + chunk_size]  # (n, C)
            t = targets[start : start + chunk_size]  # (n,)
            logits = (h @ weight.T).float()  # (n, V), fp32 (a copy when the inputs are bf16/fp16)
            if softcap is not None:
                capped = torch.tanh(logits.div_(softcap))  # (n, V), in place of the logits
                logits = capped * softcap
            nats, logprobs, counted = _chunk_nats(logits, t, ignore_index)
            del logits  # (a bf16 model's fp32 copy, or the matmul's output: either way one chunk)
            loss += nats.sum()
            if not (need_hidden or need_weight):
                continue
            dlogits = logprobs.exp_()  # softmax, in place of the log-probabilities
            dlogits[torch.arange(len(t), device=t.device), t.clamp(min=0)] -= 1.0  # - onehot
            dlogits *= counted[:, None]  # ignored rows get no gradient
            if softcap is not None:  # through the cap: d(c tanh(z / c)) / dz = 1 - tanh(z / c)**2
                dlogits *= 1 - capped.square_()
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
        return grad_hidden, grad_weight, None, None, None, None


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk_size: int | None = None,
    ignore_index: int = -100,
    softcap: float | None = None,
) -> torch.Tensor:
    """F.cross_entropy(soft_cap(hidden @ weight.T, softcap), targets, reduction="sum",
    ignore_index=ignore_index), fp32, computed chunk_size tokens at a time (default:
    default_chunk_size(V)).

    hidden (N, C), weight (V, C) (the LM head, possibly tied to the embedding), targets (N,) long.
    Returns the summed nats over the targets that are not ignore_index (0 when all are ignored); the
    mean is this divided by the number of counted targets.
    """
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    hidden, weight = autocast_inputs(hidden, weight)
    chunk_size = chunk_size or default_chunk_size(weight.size(0))
    if not (torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)):
        return cross_entropy_per_token(hidden, weight, targets, chunk_size, ignore_index, softcap).sum()
    if chunk_size >= hidden.size(0):  # one chunk: nothing to save over the plain path, which is faster
        logits = soft_cap((hidden @ weight.T).float(), softcap)
        return F.cross_entropy(logits, targets, reduction="sum", ignore_index=ignore_index)
    with torch.autocast(hidden.device.type, enabled=False):
        return _FusedLinearCrossEntropy.apply(hidden, weight, targets, chunk_size, ignore_index, softcap)
