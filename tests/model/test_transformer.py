import math

import pytest
import torch
import torch.nn.functional as F

from gpt.config import ModelConfig
from gpt.model.kv_cache import KVCache
from gpt.model.transformer import GPT, apply_rope, rope_tables, sinusoidal_table
from tests.helpers import tiny_config, tiny_model

VARIANTS = [
    dict(pos_emb="learned"),
    dict(pos_emb="sinusoidal"),
    dict(pos_emb="rope"),
    dict(norm="layernorm", ffn="gelu", bias=True),
    dict(tie_embeddings=False, bias=True, norm="layernorm"),
]


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(f"{k}={x}" for k, x in v.items()))
def test_logits_shape(variant):
    model = tiny_model(**variant)
    idx = torch.randint(50, (3, 7))
    assert model(idx).shape == (3, 7, 50)


@pytest.mark.parametrize("variant", VARIANTS[:3], ids=lambda v: v["pos_emb"])
def test_causal_future_tokens_do_not_change_past_logits(variant):
    model = tiny_model(**variant)
    idx = torch.randint(50, (2, 20))
    changed = idx.clone()
    changed[:, 12:] = (changed[:, 12:] + 1) % 50
    a, b = model(idx), model(changed)
    torch.testing.assert_close(a[:, :12], b[:, :12], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, 12:], b[:, 12:])


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(f"{k}={x}" for k, x in v.items()))
def test_initial_loss_is_log_vocab(variant):
    # Small init makes the first predictions nearly uniform: loss ~ ln(vocab) on random targets.
    model = tiny_model(vocab_size=256, **variant)
    idx, targets = torch.randint(256, (8, 32)), torch.randint(256, (8, 32))
    loss = F.cross_entropy(model(idx).flatten(0, 1), targets.flatten())
    assert abs(loss.item() - math.log(256)) < 0.1


@pytest.mark.parametrize("pos_emb", ["learned", "sinusoidal", "rope"])
@pytest.mark.parametrize("split", [1, 5, 16])
def test_cached_forward_equals_uncached(pos_emb, split):
    model = tiny_model(pos_emb=pos_emb)
    idx = torch.randint(50, (2, 24))
    full = model(idx)
    cache = KVCache.for_model(model.config, batch_size=2)
    pieces = [model(idx[:, :split], kv_cache=cache)]
    # then a chunk of several tokens at once (explicit mask path), then one token at a time
    pieces.append(model(idx[:, split : split + 3], kv_cache=cache))
    for t in range(split + 3, 24):
        pieces.append(model(idx[:, t : t + 1], kv_cache=cache))
    assert cache.pos == 24
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=0, atol=1e-5)


def test_attention_matches_manual_softmax_reference():
    model = tiny_model()
    attn = model.h[0].attn
    x = torch.randn(2, 9, 32)
    B, T, C = x.shape
    q, k, v = attn.c_attn(x).split(C, dim=2)
    q, k, v = (t.view(B, T, 4, 8).transpose(1, 2) for t in (q, k, v))
    scores = q @ k.transpose(-2, -1) / math.sqrt(8)
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    ref = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, C)
    torch.testing.assert_close(attn(x), attn.c_proj(ref), rtol=1e-5, atol=1e-6)


def test_sequence_longer_than_block_size_fails_with_values():
    model = tiny_model()
    with pytest.raises(ValueError, match="sequence length 33 exceeds block_size 32"):
        model(torch.zeros(1, 33, dtype=torch.long))


def test_tied_embeddings_share_storage_and_count_once():
    tied, untied = tiny_model(), tiny_model(tie_embeddings=False)
    assert tied.lm_head.weight is tied.wte.weight
    assert untied.num_params() - tied.num_params() == 50 * 32


def test_residual_projections_use_scaled_init():
    torch.manual_seed(0)
    model = GPT(tiny_config(n_layer=8, n_embd=256, n_head=4))
    expected = 0.02 / math.sqrt(2 * 8)
    assert model.h[0].attn.c_proj.weight.std().item() == pytest.approx(expected, rel=0.05)
    assert model.h[0].attn.c_attn.weight.std().item() == pytest.approx(0.02, rel=0.05)


def test_dropout_active_only_in_training():
    model = tiny_model(dropout=0.5)
    idx = torch.randint(50, (2, 10))
    torch.testing.assert_close(model(idx), model(idx))
    model.train()
    assert not torch.allclose(model(idx), model(idx))


def test_bias_switch():
    assert tiny_model(bias=False).h[0].attn.c_attn.bias is None
    assert tiny_model(bias=True).h[0].attn.c_attn.bias is not None


def test_swiglu_hidden_matches_gelu_parameter_count():
    swiglu = ModelConfig(n_embd=768, n_head=12)
    assert swiglu.hidden_dim == 2048  # 3 * 768 * 2048 == 2 * 768 * 3072
    assert ModelConfig(n_embd=768, n_head=12, ffn="gelu").hidden_dim == 3072


def test_sinusoidal_table_values():
    table = sinusoidal_table(10, 8)
    assert table[0].tolist() == [0.0, 1.0] * 4
    assert table[3, 0].item() == pytest.approx(math.sin(3.0))
    assert table[3, 3].item() == pytest.approx(math.cos(3.0 / 10000 ** (2 / 8)))


def test_rope_preserves_norm_and_encodes_relative_position():
    cos, sin = rope_tables(16, 8, 10000.0)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)
    rot = lambda x, p: apply_rope(x, cos[p : p + 1], sin[p : p + 1])
    torch.testing.assert_close(rot(q, 5).norm(), q.norm())
    # <R_m q, R_n k> depends on m - n only
    torch.testing.assert_close((rot(q, 7) * rot(k, 3)).sum(), (rot(q, 10) * rot(k, 6)).sum())


def test_rope_is_the_pairwise_rotation_bit_for_bit():
    # apply_rope's form (x * cos + (x2, x1) * signed sin) against the rotation written pair by pair
    cos, sin = rope_tables(64, 16, 10000.0)
    angles = torch.outer(torch.arange(64.0), 1.0 / 10000.0 ** (torch.arange(0, 16, 2) / 16.0))
    x = torch.randn(3, 2, 64, 16)
    x1, x2 = x.chunk(2, dim=-1)
    c, s = angles.cos(), angles.sin()
    expected = torch.cat((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1)
    assert torch.equal(apply_rope(x, cos, sin), expected)
    assert apply_rope(x.bfloat16(), cos, sin).dtype == torch.bfloat16


def test_rope_positions_are_not_in_state_dict():
    keys = tiny_model(pos_emb="rope").state_dict().keys()
    assert not any("rope" in k for k in keys)
    assert "wpe.weight" in tiny_model().state_dict()
