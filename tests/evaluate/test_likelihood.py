"""Continuation log-likelihoods: the harness's context/continuation split (exact token ids), and the
batched, sorted, right-padded computation against a plain reference that predicts one token at a
time, with and without left truncation."""

from __future__ import annotations

import pytest
import torch

from gpt.errors import UserError
from gpt.evaluate.likelihood import encode_pair, loglikelihoods
from gpt.tokenizer import CharTokenizer, TiktokenTokenizer
from tests.helpers import tiny_model

BLOCK_SIZE = 32  # tiny_config's


@pytest.fixture(scope="module")
def gpt2_tokenizer() -> TiktokenTokenizer:
    return TiktokenTokenizer("r50k_base")


@pytest.mark.parametrize(
    "context, continuation, ctx_ids, cont_ids",
    [
        # The context's trailing space joins the continuation: " on" (319), not "on" (261).
        ("The cat sat ", "on the mat", [464, 3797, 3332], [319, 262, 2603]),
        ("The cat sat", " on the mat", [464, 3797, 3332], [319, 262, 2603]),
        # Trailing whitespace of any kind moves: the newline (198) is the continuation's.
        ("x\n", "y", [87], [198, 88]),
        # The continuation is what follows the context's tokens in the whole text's encoding: " world"
        # (995) absorbs the context's " w" (266), so "orld" has no token of its own.
        ("hello w", "orld is big", [31373, 266], [318, 1263]),
        # No context: the end-of-text token stands in for it.
        ("", " Hello world", [50256], [18435, 995]),
    ],
)
def test_encode_pair_splits_the_whole_text_as_the_harness_does(
    gpt2_tokenizer, context, continuation, ctx_ids, cont_ids
):
    assert encode_pair(gpt2_tokenizer, context, continuation) == (ctx_ids, cont_ids)


def test_encode_pair_with_characters():
    tok = CharTokenizer(" abc", eot=True)  # ids: ' ' 0, a 1, b 2, c 3, end-of-text 4
    assert encode_pair(tok, "ab  ", "c") == ([1, 2], [0, 0, 3])
    assert encode_pair(tok, "", "ca") == ([4], [3, 1])
    assert encode_pair(tok, "  ", "a") == ([4], [0, 0, 1])  # whitespace only: no context left
    with pytest.raises(UserError, match="empty context.*tokenizer has none"):
        encode_pair(CharTokenizer(" abc"), "", "a")


def reference(model, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    """One forward per continuation token on everything before it: no batching, padding or slicing.
    The window is the harness's: the last block_size + 1 tokens, cut once for the whole request."""
    window = (context + continuation)[-(model.config.block_size + 1) :]
    start = len(window) - len(continuation)
    ll, greedy = 0.0, True
    with torch.no_grad():
        for pos in range(start, len(window)):
            logits = model(torch.tensor([window[:pos]]))[0, -1]
            ll += logits.float().log_softmax(-1)[window[pos]].item()
            greedy &= logits.argmax().item() == window[pos]
    return ll, greedy


def random_requests(seed: int = 0) -> list[tuple[list[int], list[int]]]:
    """Mixed lengths, some longer than block_size + 1 (left-truncated), one-token continuations."""
    gen = torch.Generator().manual_seed(seed)
    lengths = [(1, 1), (5, 3), (30, 2), (2, 12), (33, 4), (40, 1), (7, 7), (1, 32), (20, 20), (3, 1)]
    return [
        (
            torch.randint(0, 50, (c,), generator=gen).tolist(),
            torch.randint(0, 50, (n,), generator=gen).tolist(),
        )
        for c, n in lengths
    ]


@pytest.mark.parametrize("batch_size", [1, 3, 4, 16])
def test_loglikelihoods_equal_the_unbatched_reference(batch_size):
    model = tiny_model()
    requests = random_requests()
    assert any(len(c) + len(n) > BLOCK_SIZE + 1 for c, n in requests)
    got = loglikelihoods(model, requests, batch_size)
    want = [reference(model, c, n) for c, n in requests]
    assert [g for _, g in got] == [g for _, g in want]
    assert [ll for ll, _ in got] == pytest.approx([ll for ll, _ in want], abs=1e-5)
    assert len({round(ll, 4) for ll, _ in got}) == len(requests)  # all different: none mixed up


def test_left_truncation_scores_the_last_block_size_plus_one_tokens():
    model = tiny_model()
    context, continuation = list(range(40)), [7, 8, 9]
    kept = (context + continuation)[-(BLOCK_SIZE + 1) :]
    [(truncated, _)] = loglikelihoods(model, [(context, continuation)], 1)
    [(short, _)] = loglikelihoods(model, [(kept[:-3], continuation)], 1)
    assert truncated == pytest.approx(short, abs=1e-6)
    assert truncated == pytest.approx(reference(model, context, continuation)[0], abs=1e-5)


def greedy_path(model, context: list[int], n: int) -> list[int]:
    ids = list(context)
    with torch.no_grad():
        for _ in range(n):
            ids.append(model(torch.tensor([ids]))[0, -1].argmax().item())
    return ids[len(context) :]


def test_is_greedy_for_the_argmax_path_only():
    model = tiny_model()
    context = [1, 2, 3]
    path = greedy_path(model, context, 5)
    other = path[:-1] + [(path[-1] + 1) % 50]
    [(ll, greedy), (other_ll, other_greedy)] = loglikelihoods(model, [(context, path), (context, other)], 2)
    assert greedy and not other_greedy
    assert ll > other_ll


def test_the_model_is_left_in_its_mode():
    model = tiny_model().train()
    loglikelihoods(model, [([1], [2])], 1)
    assert model.training


def test_unscorable_requests_are_refused():
    model = tiny_model()
    with pytest.raises(UserError, match="request 1 has no continuation tokens"):
        loglikelihoods(model, [([1], [2]), ([1], [])], 2)
    with pytest.raises(UserError, match="request 0: its continuation of 33 tokens is longer than .* 32"):
        loglikelihoods(model, [([1], [2] * 33)], 1)
