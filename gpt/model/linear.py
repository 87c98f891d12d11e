"""nn.Linear whose product, for a few rows on the CPU without autograd (a decode step: one token per
sequence), is ordered so that the BLAS reads the weights at memory speed.

F.linear(x, W) is x @ W.T. For a handful of rows MKL runs it far below memory bandwidth: on a 2-core
CPU, the 45M-parameter model of bench/bench_generate.py's weights took 17 ms to read as x @ W.T for
one row (a single-threaded GEMV) and 27-36 ms for 2 to 16 rows, against 6.5 ms for W @ x.T with two
rows (MKL's GEMM, both cores) and 12.5 ms with eight (docs/benchmarks.md, "Decoding"). So a decode
step computes (W @ x.T).T, with a single row doubled: the same sum of products, in another order of
the BLAS's loops. Training (autograd on), long inputs, other devices and dtypes, and torch.compile
keep F.linear.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

FEW_ROWS = 64  # up to here the weight-major product was faster for every layer shape measured


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias), computed weight-major for a few float32 rows on the CPU without a
    gradient. x (..., in), weight (out, in) -> (..., out)."""
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
    if rows == 1:
        x2 = x2.repeat(2, 1)  # two columns: MKL's multithreaded GEMM, not its single-threaded GEMV
    y = (weight @ x2.T).T[:rows].contiguous()  # (rows, out)
    if bias is not None:
        y += bias
    return y.view(*x.shape[:-1], weight.size(0))


class Linear(nn.Linear):
    """nn.Linear (same parameters, same state dict) computed by `linear` above."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
