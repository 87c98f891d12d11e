import pytest
import torch
import torch.nn as nn

from gpt.config import ModelConfig
from gpt.generate.text import left_pad
from gpt.generate.tokens import (
    Context,
    apply_repetition_penalty,
    beam_search,
    draw,
    generate,
    sample_next,
)
from gpt.model.transformer import GPT
from tests.helpers import tiny_config, tiny_model

POS_EMBS = ["learned", "sinusoidal", "rope"]


def lively_model(**overrides) -> GPT:
    """A random tiny model with a large init: its greedy continuations vary instead of repeating
    one token, so equalities between tokens mean something."""
    return tiny_model(init_std=0.5, **overrides)


def sequence_logprob(model, prompt: list[int], continuation: list[int]) -> float:
    """log P(continuation | prompt) under the model."""
    idx = torch.tensor([prompt + continuation])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(idx)[0, :-1].float(), dim=-1)  # (T-1, V)
    targets = idx[0, 1:]
    return float(logprobs[torch.arange(len(targets)), targets][len(prompt) - 1 :].sum())


def tokens(model, idx, n, use_cache=True, **kw):
    return torch.stack(list(generate(model, idx, n, use_cache=use_cache, **kw)), dim=1)


def greedy(model, idx, n, **kw):
    return tokens(model, idx, n, temperature=0, **kw)


class TableModel(nn.Module):
    """A bigram model: the logits of the next token are table[last token]. For constructed cases."""

    def __init__(self, table: torch.Tensor, block_size: int = 64) -> None:
        super().__init__()
        self.config = ModelConfig(n_layer=1, n_head=1, n_embd=1, block_size=block_size, vocab_size=len(table))
        self.table = nn.Parameter(table.float())

    def forward(self, idx, kv_cache=None, pad=None, prefix=None):
        if kv_cache is not None:
            kv_cache.advance(idx.size(1))
        return self.table[idx]  # (B, T, V)


# ----------------------------------------------------------------------------- cache vs reference


@pytest.mark.parametrize("pos_emb", POS_EMBS)
@pytest.mark.parametrize("prompt_len", [1, 5, 31])
def test_cached_greedy_equals_uncached(pos_emb, prompt_len):
    model = lively_model(pos_emb=pos_emb)
    idx = torch.randint(50, (2, prompt_len), generator=torch.Generator().manual_seed(prompt_len))
    # 40 new tokens on a 32-token block: the context slides at least once
    cached = greedy(model, idx, 40)
    assert torch.equal(cached, greedy(model, idx, 40, use_cache=False))
    assert len(set(cached[0].tolist())) > 5  # a continuation, not one repeated token


@pytest.mark.parametrize("prefix_lm", [False, True])
@pytest.mark.parametrize("pos_emb", POS_EMBS)
@pytest.mark.parametrize("prompt_len", [1, 7, 20])
def test_cached_logits_equal_uncached_at_every_step(pos_emb, prompt_len, prefix_lm):
    """Prefill of prompt_len tokens, decode steps, slides (re-prefills): the logits of every step,
    40 tokens on a 32-token block. With prefix_lm the prompt is bidirectional in the prefill, the new
    tokens causal, and the window slides (and the prompt slides out) on both paths alike.
    (The usual init: the lively model's large activations put fp32 rounding near 1e-5.)"""
    model = tiny_model(pos_emb=pos_emb, prefix_lm=prefix_lm)
    idx = torch.randint(50, (2, prompt_len), generator=torch.Generator().manual_seed(1 + 5 * prefix_lm))
    with torch.inference_mode():
        cached = Context(model, idx, None, 40, use_cache=True)
        reference = Context(model, idx, None, 40, use_cache=False)
        for _ in range(40):
            torch.testing.assert_close(cached.logits, reference.logits, rtol=0, atol=1e-5)
            token = reference.logits.argmax(-1)
            cached.append(token)
            reference.append(token)


@pytest.mark.parametrize(
    "variant",
    [dict(norm="layernorm", ffn="gelu", bias=True), dict(tie_embeddings=False, pos_emb="rope", n_head=2)],
    ids=["layernorm-gelu-bias", "untied-rope-2heads"],
)
def test_other_model_options_cached_and_batched_equal_the_reference(variant):
    model = lively_model(**variant)
    rows = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14, 15, 16]]
    idx, lengths = left_pad(rows)
    batched = greedy(model, idx, 30, lengths=lengths)
    assert torch.equal(batched, greedy(model, idx, 30, lengths=lengths, use_cache=False))
    for row, ids in zip(batched, rows, strict=True):
        assert torch.equal(row, greedy(model, torch.tensor([ids]), 30, use_cache=False)[0])


def test_cached_sampling_equals_uncached_with_same_seed():
    model = lively_model()
    idx = torch.randint(50, (3, 4))
    kw = dict(temperature=1.0, top_k=20, top_p=0.9, min_p=0.05, repetition_penalty=1.3)
    a = tokens(model, idx, 50, True, generator=torch.Generator().manual_seed(3), **kw)
    b = tokens(model, idx, 50, False, generator=torch.Generator().manual_seed(3), **kw)
    assert torch.equal(a, b)


def test_prompt_longer_than_block_is_cropped_from_the_left():
    model = lively_model()
    idx = torch.randint(50, (1, 45))
    assert torch.equal(greedy(model, idx, 5), greedy(model, idx[:, -32:], 5))


# ----------------------------------------------------------------------------- batched


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("pos_emb", POS_EMBS)
def test_batched_rows_of_different_lengths_equal_one_at_a_time(pos_emb, use_cache):
    model = lively_model(pos_emb=pos_emb)
    g = torch.Generator().manual_seed(5)
    rows = [torch.randint(50, (n,), generator=g).tolist() for n in (3, 17, 1, 30)]
    idx, lengths = left_pad(rows)
    # 40 new tokens: the 30-token row slides first, then the others, each when it alone would.
    batched = greedy(model, idx, 40, lengths=lengths, use_cache=use_cache)
    for row, ids in zip(batched, rows, strict=True):
        assert torch.equal(row, greedy(model, torch.tensor([ids]), 40)[0])


@pytest.mark.parametrize("pos_emb", POS_EMBS)
def test_padded_row_logits_equal_the_row_alone(pos_emb):
    model = tiny_model(pos_emb=pos_emb)
    rows = [[4, 8, 15], [16, 23, 42, 7, 9, 1]]
    idx, lengths = left_pad(rows)
    with torch.inference_mode():
        batched = Context(model, idx, lengths, 5).logits
        for i, ids in enumerate(rows):
            alone = model(torch.tensor([ids]))[:, -1]
            torch.testing.assert_close(batched[i : i + 1], alone, rtol=0, atol=1e-5)


def test_repetition_penalty_ignores_left_padding():
    # Padding id 0 is the favourite token: counting padding as "seen" would penalize it.
    table = torch.zeros(5, 5)
    table[:, 0] = 3.0
    table[:, 1] = 2.0
    model = TableModel(table)
    idx, lengths = left_pad([[2], [3, 4, 2]])
    out = greedy(model, idx, 3, lengths=lengths, repetition_penalty=2.0)
    assert out.tolist() == [[0, 1, 0], [0, 1, 0]]


# ----------------------------------------------------------------------------- prefix LM


@pytest.mark.parametrize("pos_emb", POS_EMBS)
def test_prefix_lm_cached_greedy_tokens_equal_uncached(pos_emb):
    """The greedy tokens of a prefix LM whose continuations vary, through a slide."""
    idx = torch.randint(50, (2, 20), generator=torch.Generator().manual_seed(6))
    lively = lively_model(pos_emb=pos_emb, prefix_lm=True)
    out = greedy(lively, idx, 40)
    assert torch.equal(out, greedy(lively, idx, 40, use_cache=False))
    assert len(set(out[0].tolist())) > 5


@pytest.mark.parametrize("pos_emb", POS_EMBS)
def test_prefix_lm_sees_the_whole_prompt_both_ways(pos_emb):
    model = tiny_model(pos_emb=pos_emb, prefix_lm=True)
    prompt = torch.randint(50, (1, 9), generator=torch.Generator().manual_seed(7))
    with torch.inference_mode():
        first = Context(model, prompt, None, 5).logits
        both_ways = model(prompt, prefix=torch.ones_like(prompt, dtype=torch.bool))[:, -1]
        causal = model(prompt)[:, -1]
    torch.testing.assert_close(first, both_ways, rtol=0, atol=1e-6)
    assert not torch.allclose(first, causal)


def test_prefix_lm_prefix_is_what_is_left_of_the_prompt_after_a_slide():
    model = tiny_model(prefix_lm=True)  # block 32: a slide keeps 16 tokens
    idx, lengths = left_pad([[1] * 10, [2] * 4])
    ctx = Context(model, idx, lengths, 40, use_cache=False)
    expected = [[True] * 10, [False] * 6 + [True] * 4]
    assert ctx.prefix().tolist() == expected
    for _ in range(22):  # row 0 holds 32 tokens, 22 of them generated
        ctx.append(torch.tensor([3, 3]))
    assert ctx.prefix().tolist() == [e + [False] * 22 for e in expected]
    ctx.append(torch.tensor([3, 3]))  # row 0 slides to its last 16 tokens, all generated; row 1 stays
    assert ctx.lengths == [16, 27]
    assert ctx.prefix().tolist() == [[False] * 27, [True] * 4 + [False] * 23]
    for _ in range(6):  # row 1 slides too: no prompt left anywhere
        ctx.append(torch.tensor([3, 3]))
    assert ctx.lengths == [22, 16] and ctx.prefix() is None
    causal = Context(tiny_model(), idx, lengths, 40, use_cache=False)
    assert causal.prefix() is None


@pytest.mark.parametrize("pos_emb", POS_EMBS)
def test_prefix_lm_batched_rows_equal_one_at_a_time(pos_emb):
    model = lively_model(pos_emb=pos_emb, prefix_lm=True)
    g = torch.Generator().manual_seed(8)
    rows = [torch.randint(50, (n,), generator=g).tolist() for n in (3, 17, 1, 30)]
    idx, lengths = left_pad(rows)
    for use_cache in (True, False):
        batched = greedy(model, idx, 40, lengths=lengths, use_cache=use_cache)
        for row, ids in zip(batched, rows, strict=True):
            assert torch.equal(row, greedy(model, torch.tensor([ids]), 40)[0])


def test_prefix_lm_beam_search_cached_equals_uncached():
    model = lively_model(prefix_lm=True)
    idx = torch.randint(50, (1, 6), generator=torch.Generator().manual_seed(9))
    cached = beam_search(model, idx, 30, num_beams=3)  # the window slides
    assert cached == beam_search(model, idx, 30, num_beams=3, use_cache=False)
    assert beam_search(model, idx, 30, num_beams=1) == greedy(model, idx, 30)[0].tolist()


# ----------------------------------------------------------------------------- sampling


def test_greedy_is_argmax_and_top_k_1_is_greedy():
    logits = torch.randn(4, 50)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(sample_next(logits, temperature=0), logits.argmax(-1))
    assert torch.equal(sample_next(logits, 1.0, top_k=1, generator=g), logits.argmax(-1))
    assert torch.equal(sample_next(logits, 1.0, top_p=1e-6, generator=g), logits.argmax(-1))


def test_top_k_1_and_tiny_top_p_generate_the_greedy_continuation():
    model = lively_model()
    idx = torch.randint(50, (2, 5))
    ref = greedy(model, idx, 30)
    g = lambda: torch.Generator().manual_seed(0)
    assert torch.equal(tokens(model, idx, 30, temperature=1.5, top_k=1, generator=g()), ref)
    assert torch.equal(tokens(model, idx, 30, temperature=1.5, top_p=1e-4, generator=g()), ref)
    assert torch.equal(tokens(model, idx, 30, temperature=1.5, min_p=1.0, generator=g()), ref)


def test_top_k_top_p_and_min_p_keep_only_allowed_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = lambda **kw: {sample_next(logits, 1.0, generator=g, **kw).item() for _ in range(300)}
    assert draws(top_k=2) == {0, 1}
    assert draws(top_p=0.7) == {0, 1}  # 0.5 alone is not enough, 0.5 + 0.3 is
    assert draws(min_p=0.5) == {0, 1}  # at least half as likely as the best (0.25)
    assert draws(min_p=0.25) == {0, 1, 2}
    assert {sample_next(logits, 1.0, generator=g).item() for _ in range(2000)} == {0, 1, 2, 3}


def test_draws_follow_the_weights_and_never_pick_a_zero_one():
    """draw: 40000 rows at once, each frequency within 4 standard deviations of its weight, and
    what sample_next gives with top_k and top_p is the filtered, renormalized distribution."""
    n = 40_000
    g = torch.Generator().manual_seed(0)
    weights = torch.tensor([0.0, 0.5, 0.0, 0.3, 0.15, 0.05, 0.0])
    counts = torch.bincount(draw(weights.expand(n, -1), g), minlength=7)
    for got, p in zip(counts.tolist(), weights.tolist(), strict=True):
        assert abs(got - n * p) <= 4 * (n * p * (1 - p)) ** 0.5, counts  # 0 exactly for a zero weight
    assert draw(torch.tensor([[0.0, 0.0, 1e-30, 0.0]]), g).item() == 2  # the only token with weight
    logits = torch.log(torch.tensor([0.05, 0.5, 0.15, 0.3])).expand(n, -1)
    counts = torch.bincount(sample_next(logits, 1.0, top_k=3, top_p=0.7, generator=g), minlength=4)
    for got, p in zip(counts.tolist(), (0, 0.5 / 0.8, 0, 0.3 / 0.8), strict=True):
        assert abs(got - n * p) <= 4 * (n * p * (1 - p)) ** 0.5, counts


def test_repetition_penalty_values_and_effect():
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    seen = torch.tensor([[True, True, False]])
    assert apply_repetition_penalty(logits, seen, 2.0).tolist() == [[1.0, -4.0, 1.0]]
    table = torch.zeros(10, 10)
    table[:, 7], table[:, 8] = 5.0, 4.0  # 7 always wins, then 8
    model = TableModel(table)
    idx = torch.tensor([[1]])
    assert greedy(model, idx, 4).tolist() == [[7, 7, 7, 7]]
    # 7 -> 2.5 once seen, so 8 (4) wins; once both are seen 7 (2.5) beats 8 (2) again
    assert greedy(model, idx, 4, repetition_penalty=2.0).tolist() == [[7, 8, 7, 7]]
    assert greedy(model, torch.tensor([[7]]), 2, repetition_penalty=2.0).tolist() == [[8, 7]]


def test_seed_reproducible_and_seed_sensitive():
    model = lively_model()
    idx = torch.randint(50, (1, 3))
    run = lambda s: tokens(model, idx, 30, temperature=1.0, generator=torch.Generator().manual_seed(s))
    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))


def test_end_of_text_finishes_rows_and_stops_generation():
    table = torch.full((5, 5), -5.0)
    for a, b in [(0, 1), (1, 2), (2, 4), (3, 3), (4, 4)]:
        table[a, b] = 5.0
    model = TableModel(table)
    idx = torch.tensor([[0], [3]])
    out = greedy(model, idx, 10, eot_token=4)  # row 0 reaches 4 (eot); row 1 repeats 3 forever
    assert out.shape == (2, 10)
    assert out[0].tolist() == [1, 2] + [4] * 8 and out[1].tolist() == [3] * 10
    assert greedy(model, idx[:1], 10, eot_token=4).tolist() == [[1, 2, 4]]  # all rows done: stops


class PaddingWins(GPT):
    """A model whose padding ids (>= 50) would win every step if they could be sampled."""

    def forward(self, idx, kv_cache=None, pad=None, prefix=None):
        logits = super().forward(idx, kv_cache, pad, prefix=prefix)
        logits[..., 50:] = 1e4
        return logits


def test_padded_vocabulary_is_never_sampled():
    torch.manual_seed(0)
    model = PaddingWins(tiny_config(vocab_size=64)).eval()
    idx = torch.randint(50, (2, 3))
    g = lambda: torch.Generator().manual_seed(0)
    assert int(tokens(model, idx, 20, temperature=1.0, generator=g()).min()) >= 50
    assert int(tokens(model, idx, 20, temperature=1.0, generator=g(), vocab_size=50).max()) < 50


# ----------------------------------------------------------------------------- beam search


@pytest.mark.parametrize("pos_emb", POS_EMBS)
def test_one_beam_is_greedy(pos_emb):
    model = lively_model(pos_emb=pos_emb)
    idx = torch.randint(50, (1, 6))
    assert beam_search(model, idx, 40, num_beams=1) == greedy(model, idx, 40)[0].tolist()


def test_beam_search_cached_equals_uncached():
    model = lively_model()
    idx = torch.randint(50, (1, 6))
    cached = beam_search(model, idx, 40, num_beams=4)
    assert cached == beam_search(model, idx, 40, num_beams=4, use_cache=False)
    assert len(cached) == 40


def test_beam_search_finds_a_more_likely_sequence_than_greedy():
    # From 0, token 1 is the likeliest (0.5) but leads to a flat distribution (0.25 each); token 2
    # (0.4) leads to a sure 3 (0.97). Greedy takes 1 then anything: 0.125; two beams find 2, 3: 0.39.
    probs = torch.tensor(
        [
            [0.0, 0.5, 0.4, 0.1],
            [0.25, 0.25, 0.25, 0.25],
            [0.01, 0.01, 0.01, 0.97],
            [0.25, 0.25, 0.25, 0.25],
        ]
    )
    model = TableModel(probs.clamp(min=1e-9).log())
    prompt = torch.tensor([[0]])
    greedy_seq = greedy(model, prompt, 2)[0].tolist()
    beam_seq = beam_search(model, prompt, 2, num_beams=2)
    assert greedy_seq[0] == 1 and beam_seq == [2, 3]
    lp = lambda seq: sequence_logprob(model, [0], seq)
    assert lp(beam_seq) > lp(greedy_seq) + 1.0


def test_beam_search_stops_at_end_of_text_and_length_penalty_prefers_longer():
    # From 0: eot (4) at once with 0.45, or 1 (0.55) then 2, 3 surely, then eot.
    probs = torch.full((5, 5), 1e-4)
    probs[0, 4], probs[0, 1] = 0.45, 0.55
    probs[1, 2] = probs[2, 3] = probs[3, 4] = probs[4, 4] = 1.0
    model = TableModel(probs.log())
    prompt = torch.tensor([[0]])
    # Raw log-probabilities: stopping at once (0.45) vs 1, 2, 3, eot (0.55): the longer one wins.
    assert beam_search(model, prompt, 10, num_beams=2, eot_token=4, length_penalty=0.0) == [1, 2, 3]
    probs[0, 4], probs[0, 1] = 0.6, 0.4
    model = TableModel(probs.log())
    assert beam_search(model, prompt, 10, num_beams=2, eot_token=4, length_penalty=0.0) == []
    # Per token, the longer one is more likely (log 0.4 / 4 > log 0.6 / 1): length_penalty=1 picks it.
    assert beam_search(model, prompt, 10, num_beams=2, eot_token=4, length_penalty=1.0) == [1, 2, 3]


# ----------------------------------------------------------------------------- torch.compile


def compiled_tokens(model, idx, n, backend, **kw):
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        return greedy(model, idx, n, compile=backend, **kw)


@pytest.mark.parametrize("pos_emb", POS_EMBS)
def test_compiled_decode_step_traces_once_and_matches_eager(pos_emb):
    """Dynamo's trace with the eager backend: one graph for every position and every slide."""
    model = lively_model(pos_emb=pos_emb)
    idx = torch.randint(50, (1, 5))
    assert torch.equal(compiled_tokens(model, idx, 40, "eager"), greedy(model, idx, 40))
    rows = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10]]
    padded, lengths = left_pad(rows)
    expected = greedy(model, padded, 20, lengths=lengths)
    assert torch.equal(compiled_tokens(model, padded, 20, "eager", lengths=lengths), expected)


@pytest.mark.slow
def test_compiled_decode_step_with_inductor_on_cpu():
    model = lively_model(pos_emb="rope")
    idx = torch.randint(50, (2, 5))
    compiled = compiled_tokens(model, idx, 40, True)
    assert torch.equal(compiled, greedy(model, idx, 40))
