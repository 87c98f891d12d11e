"""gpt.model.loss: the chunked fused linear cross-entropy equals the plain logits path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gpt.model.loss import (
    LOGITS_PER_CHUNK,
    cross_entropy_per_token,
    default_chunk_size,
    fused_linear_cross_entropy,
)
from tests.helpers import tiny_model

IGNORE = -100


def inputs(N: int, C: int = 16, V: int = 37, seed: int = 0, ignored: slice | None = None):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, C, generator=g, requires_grad=True)
    weight = torch.randn(V, C, generator=g, requires_grad=True)
    targets = torch.randint(0, V, (N,), generator=g)
    targets[::3] = IGNORE  # scattered ignored rows
    if ignored is not None:
        targets[ignored] = IGNORE
    return hidden, weight, targets


def assert_close(actual, expected, rel: float = 1e-5, msg: str = "") -> None:
    """Within rel of the tensor's scale (its largest entry): elementwise relative error is
    meaningless for gradient entries near zero, where fp32 sums cancel."""
    atol = rel * expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=0, atol=atol, msg=msg or None)


def reference(hidden, weight, targets):
    loss = F.cross_entropy(hidden @ weight.T, targets, reduction="sum", ignore_index=IGNORE)
    return (loss, *torch.autograd.grad(loss, (hidden, weight)))


@pytest.mark.parametrize(
    ("N", "chunk_size", "ignored"),
    [
        (20, 4096, None),  # one chunk: the plain path
        (20, 19, None),  # two chunks, the second of one token
        (20, 5, None),  # a multiple of the chunk
        (23, 5, None),  # a short last chunk
        (23, 1, None),  # one token per chunk
        (20, 5, slice(5, 10)),  # a chunk of only ignored rows
        (23, 8, slice(16, 23)),  # the short last chunk, all ignored
    ],
)
def test_loss_and_gradients_equal_the_plain_path(N, chunk_size, ignored):
    hidden, weight, targets = inputs(N, ignored=ignored)
    expected, expected_dh, expected_dw = reference(hidden, weight, targets)
    loss = fused_linear_cross_entropy(hidden, weight, targets, chunk_size=chunk_size)
    dh, dw = torch.autograd.grad(loss * 3.0, (hidden, weight))  # a grad_output other than 1
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=0)
    assert_close(dh, 3.0 * expected_dh)
    assert_close(dw, 3.0 * expected_dw)
    if ignored is not None:
        assert torch.equal(dh[ignored], torch.zeros_like(dh[ignored]))


def test_all_targets_ignored_gives_zero_loss_and_zero_gradients():
    hidden, weight, targets = inputs(10)
    targets[:] = IGNORE
    loss = fused_linear_cross_entropy(hidden, weight, targets, chunk_size=4)
    loss.backward()
    assert loss.item() == 0.0
    assert not hidden.grad.any() and not weight.grad.any()


def test_without_grad_the_loss_is_the_same_and_per_token_nats_match():
    hidden, weight, targets = inputs(23)
    expected = F.cross_entropy(hidden @ weight.T, targets, reduction="none", ignore_index=IGNORE)
    with torch.no_grad():
        loss = fused_linear_cross_entropy(hidden, weight, targets, chunk_size=5)
        nats = cross_entropy_per_token(hidden, weight, targets, chunk_size=5)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, expected.sum(), rtol=1e-5, atol=0)
    assert_close(nats, expected)


def test_only_the_inputs_that_need_a_gradient_get_one():
    hidden, weight, targets = inputs(12)
    frozen = weight.detach()
    loss = fused_linear_cross_entropy(hidden, frozen, targets, chunk_size=5)
    (dh,) = torch.autograd.grad(loss, (hidden,))
    assert_close(dh, reference(hidden, weight, targets)[1])


def training_step_grads(model, idx, targets, fused: bool, chunk_size: int = 7):
    model.zero_grad()
    if fused:
        hidden = model(idx, return_hidden=True)
        loss = fused_linear_cross_entropy(
            hidden.flatten(0, 1), model.lm_head.weight, targets.flatten(), chunk_size=chunk_size
        )
    else:
        logits = model(idx)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="sum")
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def model_batch():
    model = tiny_model().train()
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 50, (3, 16), generator=g)
    targets = torch.randint(0, 50, (3, 16), generator=g)
    targets[0, :5] = IGNORE
    return model, idx, targets


def test_tied_model_training_step_matches_the_logits_path():
    model, idx, targets = model_batch()
    assert model.lm_head.weight is model.wte.weight
    expected_loss, expected = training_step_grads(model, idx, targets, fused=False)
    loss, grads = training_step_grads(model, idx, targets, fused=True)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=0)
    assert grads.keys() == expected.keys()
    for name in grads:  # the tied weight gets both its embedding and its head gradient
        assert_close(grads[name], expected[name], msg=name)


def test_bf16_autocast_is_close_to_the_plain_bf16_path():
    """Both compute the logits in bf16 and the log-softmax in fp32; they differ in rounding only
    (the fused path accumulates the weight gradient over chunks in fp32). Tolerance: 1e-2
    relative on the loss, and gradients within 2% of their largest entry."""
    model, idx, targets = model_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected_loss, expected = training_step_grads(model, idx, targets, fused=False)
        loss, grads = training_step_grads(model, idx, targets, fused=True)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, expected_loss, rtol=1e-2, atol=0)
    for name in grads:
        assert grads[name].dtype == torch.float32
        assert_close(grads[name], expected[name], rel=2e-2, msg=name)


def test_bf16_logits_are_computed_in_bf16_as_the_plain_path_does():
    """Under autocast the loss sees bf16-rounded logits: it equals the fp32 cross-entropy of the
    bf16 logits, not of the fp32 ones."""
    hidden, weight, targets = inputs(23, C=64, V=101)
    with torch.no_grad():
        bf16_logits = (hidden.bfloat16() @ weight.bfloat16().T).float()
        expected = F.cross_entropy(bf16_logits, targets, reduction="sum", ignore_index=IGNORE)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = fused_linear_cross_entropy(hidden, weight, targets, chunk_size=8)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=0)


def test_a_second_backward_fails_instead_of_giving_wrong_gradients():
    hidden, weight, targets = inputs(6)
    loss = fused_linear_cross_entropy(hidden, weight, targets, chunk_size=4) * 2.0
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward per forward"):
        loss.backward()


def test_chunk_size_must_be_positive():
    hidden, weight, targets = inputs(4)
    with pytest.raises(ValueError, match="chunk_size must be at least 1, got 0"):
        fused_linear_cross_entropy(hidden, weight, targets, chunk_size=0)


def test_the_default_chunk_holds_a_fixed_number_of_logits():
    assert default_chunk_size(50257) == LOGITS_PER_CHUNK // 50257 == 333  # r50k_base: 64 MB in fp32
    assert default_chunk_size(65) == 258111  # a character vocabulary: any batch is one chunk
    assert default_chunk_size(10**9) == 1


def test_a_batch_within_one_chunk_takes_the_plain_path_exactly():
    hidden, weight, targets = inputs(23)
    loss = fused_linear_cross_entropy(hidden, weight, targets)  # the default chunk: one
    expected, expected_dh, expected_dw = reference(hidden, weight, targets)
    assert torch.equal(loss, expected)
    dh, dw = torch.autograd.grad(loss, (hidden, weight))
    assert torch.equal(dh, expected_dh) and torch.equal(dw, expected_dw)
