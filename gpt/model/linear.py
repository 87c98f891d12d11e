"""nn.Linear whose product, for a few rows on the CPU without autograd (a decode step: one token per
sequence), is computed by the BLAS call that reads the weights fastest.

F.linear(x, W) is x @ W.T, and for a handful of rows MKL runs it far below memory bandwidth. On a
2-core CPU (AVX-512), reading the weights of bench/bench_generate.py's 45M-parameter model took:

| rows | x @ W.T (F.linear) | W @ x.T | oneDNN, weights in its blocked layout |
| ---: | ---: | ---: | ---: |
| 1 | 17 ms (MKL's GEMV: one thread) | 6.7 ms (the row doubled: a GEMM) | 8.8 ms |
| 2 | 36 ms | 6.1 ms | 10.2 ms |
| 8 | 27 ms | 12.5-13.7 ms | 9.6-10.8 ms |
| 16 | 33 ms | 24 ms | 11.3-13.3 ms |

So one or two rows are computed as (W @ x.T).T, and 3 to 64 rows by oneDNN's linear on a copy of
the weights in its blocked layout, made once per weight on first use (it doubles the memory of the
weights that a batched decode uses; generating for one prompt never makes it). Both are the same
sum of products in another order of the BLAS's loops. Training (autograd on), longer inputs, other
devices and dtypes, and torch.compile keep F.linear.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn as nn
import torch.nn.functional as F

FEW_ROWS = 64  # up to here the products below were faster than F.linear for every layer shape measured
_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
# id(weight) -> (the weight's version when packed, the packed copy); dropped with the weight
_packed: dict[int, tuple[int, torch.Tensor]] = {}


def packed(weight: torch.Tensor) -> torch.Tensor:
    """weight (out, in) in oneDNN's blocked layout for a linear of a few rows, made once (again if
    the weight was changed in place since)."""
    key, version = id(weight), weight._version
    hit = _packed.get(key)
    if hit is None:
        weakref.finalize(weight, _packed.pop, key, None)
    if hit is None or hit[0] != version:
        hit = _packed[key] = (version, torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 8))
    return hit[1]


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias), computed as the table above says for a few float32 rows on the CPU
    without a gradient. x (..., in), weight (out, in) -> (..., out)."""
    rows = x.numel() // x.size(-1) if x.size(-1) else 0
    if (
        not 0 < rows <= FEW_ROWS
        or x.device.type != "cpu"
        or x.dtype != torch.float32
        or weight.dtype != torch.float32
        or torch.is_grad_enabled()
        or torch.compiler.is_compiling()
    ):
        return F.linear(x, weight, bias)
    x2 = x.reshape(rows, x.size(-1))
    if rows > 2 and _ONEDNN:
        y = torch.ops.mkldnn._linear_pointwise(x2.contiguous(), packed(weight), bias, "none", [None], "")
    else:
        if rows == 1:
            x2 = torch.cat([x2, x2])  # two columns: MKL's multithreaded GEMM, not its one-thread GEMV
        y = (weight @ x2.T).T[:rows].contiguous()  # (rows, out)
        if bias is not None:
            y += bias
    return y.view(*x.shape[:-1], weight.size(0))


class Linear(nn.Linear):
    """nn.Linear (same parameters, same state dict) computed by `linear` above."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
