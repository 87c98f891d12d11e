"""FlexAttention for document masks (gpt/model/flex.py) on a CUDA GPU, compiled: the same outputs and
gradients as SDPA with the dense mask. Run with `pytest -m gpu`; without CUDA every test here is
skipped, and the default run never selects them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gpt.model import flex
from gpt.model.transformer import attention_mask
from tests.helpers import tiny_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def packed_segments(B: int, T: int, seed: int = 0) -> torch.Tensor:
    """(B, T) segment ids of documents of 1 to 300 tokens, packed back to back, on the GPU."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 300, (B, T), generator=g)
    return torch.stack([torch.repeat_interleave(torch.arange(T), row)[:T] for row in lengths]).cuda()


@pytest.fixture(autouse=True)
def no_tf32():
    """fp32 matmuls in fp32 on both paths, so that they agree to fp32 rounding."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = before


@pytest.mark.parametrize("T", [512, 300])  # whole 128-token tiles, and a partial last one
def test_flex_attention_equals_dense_sdpa_forward_and_backward(T):
    """Tolerance: 1e-4 absolute and relative in fp32 (the kernels sum in different orders); a wrong
    mask is off by tenths."""
    B, nh, hs = 2, 4, 64
    segments = packed_segments(B, T)
    q, k, v = (torch.randn(B, nh, T, hs, device="cuda", requires_grad=True) for _ in range(3))

    @torch.compile
    def flexed(q, k, v, segments):
        return flex.attend(q, k, v, flex.document_block_mask(segments))

    dense_mask = attention_mask(torch.arange(T, device="cuda"), T, segments=segments)
    out = flexed(q, k, v, segments)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=dense_mask)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(expected, (q, k, v), grad)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_a_compiled_model_takes_flex_attention_for_segments():
    idx = torch.zeros(2, 256, dtype=torch.long, device="cuda")
    segments = packed_segments(2, 256)

    @torch.compile
    def taken(idx, segments):
        return idx + flex.applies(idx, 32, segments, (None, None, None), 0.0)

    assert taken(idx, segments).eq(1).all()
    assert not flex.applies(idx, 32, segments, (None, None, None), 0.0)  # eagerly: the dense mask


def test_compiled_model_with_documents_equals_eager_forward_and_backward():
    """The whole model: compiled (FlexAttention) against eager (the dense mask), logits and every
    gradient. Tolerance: 1e-3 as for compiled against eager logits (test_gpu_numerics.py)."""
    model = tiny_model(n_layer=2, n_head=4, n_embd=128, block_size=256, vocab_size=65).cuda().train()
    idx = torch.randint(65, (2, 256), device="cuda")
    segments = packed_segments(2, 256, seed=1)
    starts = torch.ones_like(segments, dtype=torch.bool)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
    index = torch.arange(256, device="cuda").expand(2, -1)
    positions = index - torch.where(starts, index, 0).cummax(1).values

    def run(forward):
        model.zero_grad(set_to_none=True)
        logits = forward(idx, positions=positions, segments=segments)
        logits.float().square().mean().backward()
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    eager_logits, eager_grads = run(model)
    compiled_logits, compiled_grads = run(torch.compile(model))
    torch.testing.assert_close(compiled_logits, eager_logits, rtol=1e-3, atol=1e-3)
    for name, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-3, atol=1e-3, msg=name)
