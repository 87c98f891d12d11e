"""SwiGLU's second half, c_proj(silu(gate) * up), whose backward recomputes the elementwise part
instead of keeping it (docs/design.md, "SwiGLU's backward")."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gpt.model.autocast import autocast_inputs
from gpt.model.linear import linear


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
        return linear(F.silu(gate) * up, weight, bias)
    gate_up, weight, bias = autocast_inputs(gate_up, weight, bias)  # (gpt/model/autocast.py)
    with torch.autocast(gate_up.device.type, enabled=False):
        return _SwiGLUProjection.apply(gate_up, weight, bias)
