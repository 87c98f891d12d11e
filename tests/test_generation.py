import pytest
import torch

from gpt.generation import generate, sample_next
from gpt.model import GPT
from tests.conftest import tiny_config, tiny_model


def tokens(model, idx, n, use_cache, **kw):
    return torch.stack(list(generate(model, idx, n, use_cache=use_cache, **kw)), dim=1)


@pytest.mark.parametrize("pos_emb", ["learned", "sinusoidal", "rope"])
@pytest.mark.parametrize("prompt_len", [1, 5, 31])
def test_cached_greedy_equals_uncached(pos_emb, prompt_len):
    model = tiny_model(pos_emb=pos_emb)
    idx = torch.randint(50, (2, prompt_len))
    # 40 new tokens on a 32-token block: the context slides at least once
    cached = tokens(model, idx, 40, True, temperature=0)
    uncached = tokens(model, idx, 40, False, temperature=0)
    assert torch.equal(cached, uncached)


def test_cached_sampling_equals_uncached_with_same_seed():
    model = tiny_model()
    idx = torch.randint(50, (3, 4))
    a = tokens(model, idx, 50, True, temperature=1.0, generator=torch.Generator().manual_seed(3))
    b = tokens(model, idx, 50, False, temperature=1.0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_prompt_longer_than_block_is_cropped_from_the_left():
    model = tiny_model()
    idx = torch.randint(50, (1, 45))
    cropped = tokens(model, idx[:, -32:], 5, True, temperature=0)
    assert torch.equal(tokens(model, idx, 5, True, temperature=0), cropped)


def test_greedy_is_argmax_and_top_k_1_is_greedy():
    logits = torch.randn(4, 50)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(sample_next(logits, temperature=0), logits.argmax(-1))
    assert torch.equal(sample_next(logits, 1.0, top_k=1, generator=g), logits.argmax(-1))
    assert torch.equal(sample_next(logits, 1.0, top_p=1e-6, generator=g), logits.argmax(-1))


def test_top_k_and_top_p_keep_only_allowed_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws_k = {sample_next(logits, 1.0, top_k=2, generator=g).item() for _ in range(300)}
    assert draws_k == {0, 1}
    # top_p=0.7: 0.5 alone is not enough, 0.5+0.3 is: tokens {0, 1}
    draws_p = {sample_next(logits, 1.0, top_p=0.7, generator=g).item() for _ in range(300)}
    assert draws_p == {0, 1}
    draws_all = {sample_next(logits, 1.0, generator=g).item() for _ in range(2000)}
    assert draws_all == {0, 1, 2, 3}


def test_seed_reproducible_and_seed_sensitive():
    model = tiny_model()
    idx = torch.randint(50, (1, 3))
    run = lambda s: tokens(model, idx, 30, True, temperature=1.0, generator=torch.Generator().manual_seed(s))
    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))


class PaddingWins(GPT):
    """A model whose padding ids (>= 50) would win every step if they could be sampled."""

    def forward(self, idx, kv_cache=None):
        logits = super().forward(idx, kv_cache)
        logits[..., 50:] = 1e4
        return logits


def test_padded_vocabulary_is_never_sampled():
    torch.manual_seed(0)
    model = PaddingWins(tiny_config(vocab_size=64)).eval()
    idx = torch.randint(50, (2, 3))
    g = lambda: torch.Generator().manual_seed(0)
    assert int(tokens(model, idx, 20, True, temperature=1.0, generator=g()).min()) >= 50
    assert int(tokens(model, idx, 20, True, temperature=1.0, generator=g(), vocab_size=50).max()) < 50
