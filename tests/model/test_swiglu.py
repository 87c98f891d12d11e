"""gpt.model.swiglu: the SwiGLU projection that recomputes its product in the backward gives what
autograd gives for c_proj(silu(gate) * up), and keeps less."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gpt.model import transformer
from gpt.model.swiglu import swiglu_projection
from tests.helpers import tiny_model


def autograd_swiglu(gate_up, weight, bias):
    gate, up = gate_up.chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, weight, bias)


def inputs(bias: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    gate_up = torch.randn(3, 5, 16, generator=g, requires_grad=True)
    weight = torch.randn(4, 8, generator=g, requires_grad=True)
    b = torch.randn(4, generator=g, requires_grad=True) if bias else None
    grad_out = torch.randn(3, 5, 4, generator=g)
    return gate_up, weight, b, grad_out


def assert_close(actual, expected, rel: float = 1e-6, msg: str | None = None) -> None:
    """Within rel of the tensor's largest entry (entries near zero cancel in fp32 sums)."""
    torch.testing.assert_close(actual, expected, rtol=0, atol=rel * expected.abs().max().item(), msg=msg)


@pytest.mark.parametrize("bias", [False, True])
def test_output_is_identical_and_gradients_equal_autograds(bias):
    gate_up, weight, b, grad_out = inputs(bias)
    leaves = [gate_up, weight] + ([b] if bias else [])
    expected = autograd_swiglu(gate_up, weight, b)
    out = swiglu_projection(gate_up, weight, b)
    assert torch.equal(out, expected)
    got = torch.autograd.grad(out, leaves, grad_out)
    want = torch.autograd.grad(expected, leaves, grad_out)
    for g, w in zip(got, want, strict=True):
        assert_close(g, w)


def test_only_the_inputs_that_need_a_gradient_get_one():
    gate_up, weight, _, grad_out = inputs(False)
    frozen = weight.detach()
    (got,) = torch.autograd.grad(swiglu_projection(gate_up, frozen, None), (gate_up,), grad_out)
    (want,) = torch.autograd.grad(autograd_swiglu(gate_up, frozen, None), (gate_up,), grad_out)
    assert_close(got, want)
    weight_only = gate_up.detach()
    (got,) = torch.autograd.grad(swiglu_projection(weight_only, weight, None), (weight,), grad_out)
    (want,) = torch.autograd.grad(autograd_swiglu(weight_only, weight, None), (weight,), grad_out)
    assert_close(got, want)


def test_bf16_autocast_computes_in_bf16_and_gives_fp32_parameter_gradients():
    gate_up, weight, b, grad_out = inputs(True)
    leaves = [gate_up, weight, b]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = swiglu_projection(gate_up.bfloat16(), weight, b)
        expected = autograd_swiglu(gate_up.bfloat16(), weight, b)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, expected)
    got = torch.autograd.grad(out, leaves, grad_out.bfloat16())
    want = torch.autograd.grad(expected, leaves, grad_out.bfloat16())
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype == torch.float32
        assert_close(g, w, rel=1e-2)  # bf16 rounding of the recomputed product


def test_a_model_step_matches_autograds_swiglu(monkeypatch):
    model = tiny_model().train()
    idx = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(1))

    def step():
        model.zero_grad()
        loss = F.cross_entropy(model(idx).flatten(0, 1), idx.roll(-1, 1).flatten())
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    loss, grads = step()
    monkeypatch.setattr(transformer, "swiglu_projection", autograd_swiglu)
    expected_loss, expected = step()
    assert torch.equal(loss, expected_loss)
    for name in expected:
        assert_close(grads[name], expected[name], rel=1e-5, msg=name)


def test_it_keeps_less_for_the_backward_than_autograd():
    """What the graph holds for the backward, counted through saved-tensor hooks: c_fc's output
    only (2 x hidden per token), against autograd's c_fc output, silu(gate) and the product (4 x)."""

    def saved_numbers(fn) -> int:
        seen: dict[int, int] = {}

        def pack(t):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes() // t.element_size()
            return t

        gate_up = torch.randn(64, 2 * 32, requires_grad=True)
        weight = torch.randn(16, 32, requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn(gate_up, weight, None)
        return sum(seen.values()) - weight.numel()

    assert saved_numbers(swiglu_projection) == 64 * 2 * 32
    assert saved_numbers(autograd_swiglu) == 64 * 4 * 32
