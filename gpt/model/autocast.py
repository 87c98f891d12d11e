"""Custom autograd Functions under autocast (gpt/model/loss.py, gpt/model/swiglu.py).

Autocast does not look inside a custom Function: its matmuls would meet fp32 weights and bf16
activations. So the inputs are cast here, outside the Function, as autocast would cast a matmul's
inputs, and autograd casts the gradients back to each input's own dtype; the Function itself then
runs with autocast off.
"""

from __future__ import annotations

import torch


def autocast_inputs(*tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """The tensors in the autocast dtype where autocast is on for their device (None stays None)."""
    device = next(t for t in tensors if t is not None).device.type
    if not torch.is_autocast_enabled(device):
        return tensors
    dtype = torch.get_autocast_dtype(device)
    return tuple(None if t is None else t.to(dtype) for t in tensors)
