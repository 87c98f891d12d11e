"""Packed rows (segments, positions) and the prefix LM: each example computes what it would alone;
a prompt attends both ways only with prefix_lm; masked attention stays off SDPA's math kernel."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gpt.model.kv_cache import KVCache
from gpt.model.transformer import attention_mask
from tests.helpers import tiny_model

POS_EMBS = ["learned", "sinusoidal", "rope"]
VOCAB = 50


def pack(examples: list[torch.Tensor], width: int, prompts: list[int] | None = None):
    """One packed row of width tokens: (idx, positions, segments, prefix), each (width,)."""
    idx = torch.zeros(width, dtype=torch.long)
    positions = torch.zeros(width, dtype=torch.long)
    segments = torch.full((width,), -1, dtype=torch.long)
    prefix = torch.zeros(width, dtype=torch.bool)
    start = 0
    for i, ex in enumerate(examples):
        n = len(ex)
        idx[start : start + n] = ex
        positions[start : start + n] = torch.arange(n)
        segments[start : start + n] = i
        if prompts is not None:
            prefix[start : start + prompts[i]] = True
        start += n
    return idx, positions, segments, prefix


def packed_batch(lengths_per_row: list[list[int]], width: int, prompt_share: float = 0.5, seed: int = 0):
    """A batch of packed rows of random examples; returns the batch tensors and the examples."""
    g = torch.Generator().manual_seed(seed)
    rows, examples = [], []
    for lengths in lengths_per_row:
        exs = [torch.randint(VOCAB, (n,), generator=g) for n in lengths]
        prompts = [max(1, int(n * prompt_share)) for n in lengths]
        rows.append(pack(exs, width, prompts))
        examples.append(list(zip(exs, prompts, strict=True)))
    idx, positions, segments, prefix = (torch.stack(t) for t in zip(*rows, strict=True))
    return (idx, positions, segments, prefix), examples


LAYOUT = [[5, 9, 3], [12, 1, 4, 3]]  # two rows of 20: the first ends in 3 tokens of padding


@pytest.mark.parametrize("prefix_lm", [False, True])
@pytest.mark.parametrize("pos_emb", POS_EMBS)
def test_packed_examples_compute_what_they_would_alone(pos_emb, prefix_lm):
    model = tiny_model(pos_emb=pos_emb, prefix_lm=prefix_lm)
    (idx, positions, segments, prefix), examples = packed_batch(LAYOUT, width=20)
    with torch.no_grad():
        packed = model(idx, positions=positions, segments=segments, prefix=prefix)
        assert torch.isfinite(packed).all()  # padding included
        for row, exs in enumerate(examples):
            start = 0
            for ex, n_prompt in exs:
                own_prefix = (torch.arange(len(ex)) < n_prompt)[None]
                alone = model(ex[None], prefix=own_prefix)[0]
                torch.testing.assert_close(packed[row, start : start + len(ex)], alone, rtol=0, atol=1e-5)
                start += len(ex)


@pytest.mark.parametrize("prefix_lm", [False, True])
@pytest.mark.parametrize("pos_emb", POS_EMBS)
def test_packed_gradients_equal_the_sum_over_examples_alone(pos_emb, prefix_lm):
    model = tiny_model(pos_emb=pos_emb, prefix_lm=prefix_lm).train()  # dropout 0: deterministic
    (idx, positions, segments, prefix), examples = packed_batch(LAYOUT, width=20, seed=1)
    targets = torch.randint(VOCAB, idx.shape, generator=torch.Generator().manual_seed(2))
    targets[segments < 0] = -100

    logits = model(idx, positions=positions, segments=segments, prefix=prefix)
    packed_loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum")
    packed_grads = torch.autograd.grad(packed_loss, list(model.parameters()))

    alone_loss = 0.0
    for row, exs in enumerate(examples):
        start = 0
        for ex, n_prompt in exs:
            own_prefix = (torch.arange(len(ex)) < n_prompt)[None]
            logits = model(ex[None], prefix=own_prefix)[0]
            own_targets = targets[row, start : start + len(ex)]
            alone_loss = alone_loss + F.cross_entropy(logits, own_targets, reduction="sum")
            start += len(ex)
    alone_grads = torch.autograd.grad(alone_loss, list(model.parameters()))
    torch.testing.assert_close(packed_loss, alone_loss, rtol=1e-6, atol=0)  # a sum of 37 terms
    for (name, _), a, b in zip(model.named_parameters(), packed_grads, alone_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)


def test_attention_mask_is_causal_within_segments_and_both_ways_within_the_prefix():
    segments = torch.tensor([[0, 0, 0, 1, 1, 1, -1]])
    prefix = torch.tensor([[1, 1, 0, 1, 1, 0, 0]], dtype=torch.bool)
    mask = attention_mask(torch.arange(7), 7, segments=segments, prefix=prefix)[0, 0].int()
    expected = torch.tensor(
        [
            [1, 1, 0, 0, 0, 0, 0],  # a prefix token sees the later prefix token of its segment
            [1, 1, 0, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0, 0],  # a completion token is causal
            [0, 0, 0, 1, 1, 0, 0],  # never another segment
            [0, 0, 0, 1, 1, 0, 0],
            [0, 0, 0, 1, 1, 1, 0],
            [0, 0, 0, 0, 0, 0, 1],  # padding sees only padding
        ]
    )
    assert torch.equal(mask, expected)


@pytest.mark.parametrize("prefix_lm", [False, True])
@pytest.mark.parametrize("pos_emb", POS_EMBS)
def test_a_later_prompt_token_changes_earlier_prompt_outputs_only_in_a_prefix_lm(pos_emb, prefix_lm):
    model = tiny_model(pos_emb=pos_emb, prefix_lm=prefix_lm)
    idx = torch.randint(VOCAB, (2, 16), generator=torch.Generator().manual_seed(3))
    prefix = torch.arange(16)[None].expand(2, -1) < 8  # a prompt of 8 tokens, then 8 of completion
    changed = idx.clone()
    changed[:, 6] = (changed[:, 6] + 1) % VOCAB  # a prompt token
    with torch.no_grad():
        a, b = model(idx, prefix=prefix), model(changed, prefix=prefix)
    assert torch.allclose(a[:, :6], b[:, :6], rtol=0, atol=1e-6) != prefix_lm
    assert not torch.allclose(a[:, 6:], b[:, 6:])


@pytest.mark.parametrize("prefix_lm", [False, True])
@pytest.mark.parametrize("pos_emb", POS_EMBS)
def test_a_completion_token_never_changes_an_earlier_output(pos_emb, prefix_lm):
    model = tiny_model(pos_emb=pos_emb, prefix_lm=prefix_lm)
    idx = torch.randint(VOCAB, (2, 16), generator=torch.Generator().manual_seed(4))
    prefix = torch.arange(16)[None].expand(2, -1) < 8
    for t in (8, 12):  # the first completion token, and one in the middle
        changed = idx.clone()
        changed[:, t] = (changed[:, t] + 1) % VOCAB
        with torch.no_grad():
            a, b = model(idx, prefix=prefix), model(changed, prefix=prefix)
        torch.testing.assert_close(a[:, :t], b[:, :t], rtol=0, atol=1e-6)
        assert not torch.allclose(a[:, t:], b[:, t:])


def test_without_prefix_lm_a_prefix_changes_nothing():
    model = tiny_model()
    idx = torch.randint(VOCAB, (2, 12))
    prefix = torch.ones(2, 12, dtype=torch.bool)
    with torch.no_grad():
        torch.testing.assert_close(model(idx, prefix=prefix), model(idx), rtol=0, atol=0)


@pytest.mark.parametrize("pos_emb", POS_EMBS)
def test_prefix_lm_cached_prefill_and_decode_equal_the_full_forward(pos_emb):
    """Left padded rows: the prompt (each row's real tokens) is the prefix of the prefill; the
    tokens decoded one by one after it are causal."""
    model = tiny_model(pos_emb=pos_emb, prefix_lm=True)
    idx = torch.randint(VOCAB, (2, 20), generator=torch.Generator().manual_seed(5))
    pad = torch.tensor([0, 3])
    width = 8  # prompt slots; row 1's prompt is slots 3..7
    prefix = (torch.arange(width)[None] >= pad[:, None]) & (torch.arange(width)[None] < width)
    full_prefix = torch.cat([prefix, torch.zeros(2, 12, dtype=torch.bool)], dim=1)
    with torch.no_grad():
        full = model(idx, pad=pad, prefix=full_prefix)
        cache = KVCache.for_model(model.config, batch_size=2)
        pieces = [model(idx[:, :width], kv_cache=cache, pad=pad, prefix=prefix)]
        pieces += [model(idx[:, t : t + 1], kv_cache=cache, pad=pad) for t in range(width, 20)]
    real = torch.arange(20)[None] >= pad[:, None]  # outputs on padding are never used
    torch.testing.assert_close(torch.cat(pieces, dim=1)[real], full[real], rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="prefix must be run in the first forward"):
        model(idx[:, :1], kv_cache=cache, prefix=torch.ones(2, 1, dtype=torch.bool))


def test_segments_need_positions_and_no_cache():
    model = tiny_model()
    idx, segments = torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="segments"):
        model(idx, segments=segments)
    cache = KVCache.for_model(model.config, batch_size=1)
    with pytest.raises(ValueError, match="segments"):
        model(idx, kv_cache=cache, positions=segments, segments=segments)


@pytest.mark.gpu
@pytest.mark.parametrize("pos_emb", POS_EMBS)
def test_masked_attention_runs_on_a_fast_kernel_in_bf16(pos_emb):
    """Packed rows and a prefix (forward and backward), and a cached prefill with padding, with
    SDPA allowed only its memory-efficient and flash kernels: fails if only the math kernel takes
    the mask."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    model = tiny_model(pos_emb=pos_emb, prefix_lm=True, n_embd=128, n_head=4, block_size=64)
    model = model.cuda().to(torch.bfloat16)
    reference = tiny_model(pos_emb=pos_emb, prefix_lm=True, n_embd=128, n_head=4, block_size=64).cuda()
    (idx, positions, segments, prefix), _ = packed_batch([[20, 30, 9], [40, 24]], width=64)
    batch = [t.cuda() for t in (idx, positions, segments, prefix)]
    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION]):
        model.train()
        logits = model(batch[0], positions=batch[1], segments=batch[2], prefix=batch[3])
        logits.float().square().mean().backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())
        model.eval()
        with torch.no_grad():
            logits = model(batch[0], positions=batch[1], segments=batch[2], prefix=batch[3])
            cache = KVCache.for_model(model.config, 2, device="cuda", dtype=torch.bfloat16)
            pad = torch.tensor([0, 5], device="cuda")
            prompt = (torch.arange(16, device="cuda")[None] >= pad[:, None]).expand(2, -1)
            model(batch[0][:, :16], kv_cache=cache, pad=pad, prefix=prompt)
            model(batch[0][:, 16:17], kv_cache=cache, pad=pad)
    with torch.no_grad():
        expected = reference(batch[0], positions=batch[1], segments=batch[2], prefix=batch[3])
    torch.testing.assert_close(logits.float(), expected, rtol=0, atol=5e-2)
