"""The SwiGLU feed-forward's second half, c_proj(silu(gate) * up), with a backward that recomputes
the elementwise part instead of keeping it.

Why: autograd through `c_proj(F.silu(gate) * up)` keeps, for the backward of every layer, c_fc's
output (gate and up: 2 x hidden_dim numbers per token), silu(gate) (hidden_dim) and the product
(hidden_dim): 4 x hidden_dim per token, the largest share of a block's activations. This Function
keeps only c_fc's output and recomputes silu and the product in the backward, elementwise work that
is cheap next to the block's matmuls. For model=medium (hidden_dim 2,048) at 4 x 1024 tokens in
fp32 that is 12 layers x 4,096 tokens x 4,096 x 4 bytes = 805 MB less at the peak of a step.

The same trade as Liger-Kernel's SwiGLU (which keeps the product for c_proj, so it saves half of
this) and as activation recomputation in general; under torch.compile, Inductor's partitioner makes
it by itself. Liger needs Triton and a GPU; this is a few lines of plain PyTorch, on any device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gpt.model.autocast import autocast_inputs


class _SwiGLUProjection(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate_up, weight, bias):
        gate, up = gate_up.chunk(2, dim=-1)
        ctx.save_for_backward(gate_up, weight)
        ctx.has_bias = bias is not None
        return F.linear(F.silu(gate) * up, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        gate_up, weight = ctx.saved_tensors
        need_input, need_weight, need_bias = ctx.needs_input_grad
        gate, up = gate_up.chunk(2, dim=-1)
        silu = F.silu(gate)
        grad_gate_up = grad_weight = grad_bias = None
        if need_input:  # written into the halves of one tensor: no concatenation
            grad_product = grad_out @ weight  # (..., hidden_dim)
            grad_gate_up = torch.empty_like(gate_up)
            grad_gate, grad_up = grad_gate_up.chunk(2, dim=-1)
            torch.mul(grad_product, silu, out=grad_up)
            # silu's own backward kernel, as autograd runs it: d silu(g) / dg times the gradient
            torch.ops.aten.silu_backward.grad_input(grad_product.mul_(up), gate, grad_input=grad_gate)
        if need_weight:
            product = silu.mul_(up).flatten(0, -2)  # (tokens, hidden_dim), in place of silu
            grad_weight = grad_out.flatten(0, -2).T @ product
        if need_bias and ctx.has_bias:
            grad_bias = grad_out.flatten(0, -2).sum(0)
        return grad_gate_up, grad_weight, grad_bias


def swiglu_projection(gate_up: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear(F.silu(gate) * up, weight, bias), where gate, up = gate_up.chunk(2, dim=-1).

    gate_up (..., 2 * hidden_dim) is c_fc's output; weight (n_embd, hidden_dim) and bias are c_proj's.
    Without a gradient to compute, it is that expression itself.
    """
    if not torch.is_grad_enabled():
        gate, up = gate_up.chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, weight, bias)
    gate_up, weight, bias = autocast_inputs(gate_up, weight, bias)  # (gpt/model/autocast.py)
    with torch.autocast(gate_up.device.type, enabled=False):
        return _SwiGLUProjection.apply(gate_up, weight, bias)
