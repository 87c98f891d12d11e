"""The model options of the GPT-2 speedrun records (qk_norm, ffn=relu2, logit_softcap, zero_init_proj,
tie_embeddings=false, value_embeds), each alone and all together: generation with the KV cache equals
the uncached reference, padded and packed rows equal each row alone, the fused loss equals plain
cross-entropy, and each option does what it says."""

import pytest
import torch
import torch.nn.functional as F

from gpt.generate.text import left_pad
from gpt.generate.tokens import Context, generate
from gpt.model.loss import fused_linear_cross_entropy, soft_cap
from gpt.train.optim import muon_split
from tests.helpers import tiny_model

OPTIONS = {
    "qk_norm": dict(qk_norm=True),
    "relu2": dict(ffn="relu2"),
    "softcap": dict(logit_softcap=2.0),  # small, so that it bites on a tiny model's logits
    "zero_init_proj": dict(zero_init_proj=True),
    "untied": dict(tie_embeddings=False),
    "value_embeds": dict(value_embeds=True),
}
OPTIONS["all"] = {k: v for option in OPTIONS.values() for k, v in option.items()}


def stepped_model(option: str, pos_emb: str = "rope", lr: float = 3e-2, **overrides):
    """tiny_model with the option, after one AdamW step on a random batch: off its init, so that
    zero-initialised projections and the value embeddings' mixes take part."""
    model = tiny_model(pos_emb=pos_emb, **OPTIONS[option], **overrides).train()
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(50, (4, 32), generator=g)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    hidden = model(idx[:, :-1], return_hidden=True)
    loss = fused_linear_cross_entropy(
        hidden.flatten(0, 1), model.lm_head.weight, idx[:, 1:].flatten(), softcap=model.config.logit_softcap
    )
    loss.backward()
    opt.step()
    return model.eval()


def greedy(model, idx, n, **kw):
    return torch.stack(list(generate(model, idx, n, temperature=0, **kw)), dim=1)


@pytest.mark.parametrize(
    ("option", "pos_emb"),
    [*((option, "rope") for option in OPTIONS), ("all", "learned"), ("all", "sinusoidal")],
)
def test_cached_logits_and_greedy_tokens_equal_uncached(option, pos_emb):
    """40 tokens on a 32-token block (the window slides): cached logits == uncached within 1e-5 at
    every step, and the same greedy tokens."""
    model = stepped_model(option, pos_emb)
    idx = torch.randint(50, (2, 5), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        cached = Context(model, idx, None, 40, use_cache=True)
        reference = Context(model, idx, None, 40, use_cache=False)
        for _ in range(40):
            torch.testing.assert_close(cached.logits, reference.logits, rtol=0, atol=1e-5)
            token = reference.logits.argmax(-1)
            cached.append(token)
            reference.append(token)
    tokens = greedy(model, idx, 40)
    assert torch.equal(tokens, greedy(model, idx, 40, use_cache=False))


@pytest.mark.parametrize("option", OPTIONS)
def test_padded_and_packed_rows_equal_each_row_alone(option):
    model = stepped_model(option)
    rows = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14, 15, 16]]
    idx, lengths = left_pad(rows)
    batched = greedy(model, idx, 20, lengths=lengths)
    for row, ids in zip(batched, rows, strict=True):
        assert torch.equal(row, greedy(model, torch.tensor([ids]), 20, use_cache=False)[0])
    # Packed, as training on examples packs them: one row, two segments, positions restarting.
    packed = torch.tensor([rows[0] + rows[1]])
    positions = torch.tensor([list(range(3)) + list(range(9))])
    segments = torch.tensor([[0] * 3 + [1] * 9])
    with torch.no_grad():
        logits = model(packed, positions=positions, segments=segments)[0]
        torch.testing.assert_close(logits[:3], model(torch.tensor([rows[0]]))[0], rtol=0, atol=1e-5)
        torch.testing.assert_close(logits[3:], model(torch.tensor([rows[1]]))[0], rtol=0, atol=1e-5)


@pytest.mark.parametrize("option", OPTIONS)
def test_fused_loss_equals_plain_cross_entropy(option):
    """Chunked (7 tokens a chunk: several chunks and a short last one) == F.cross_entropy over the
    model's own logits, in value and in every gradient."""
    model = stepped_model(option).train()
    idx = torch.randint(50, (3, 17), generator=torch.Generator().manual_seed(2))
    x, y = idx[:, :-1], idx[:, 1:].flatten()

    def grads(loss):
        model.zero_grad()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain, plain_grads = grads(F.cross_entropy(model(x).flatten(0, 1), y, reduction="sum"))
    hidden = model(x, return_hidden=True).flatten(0, 1)
    fused, fused_grads = grads(
        fused_linear_cross_entropy(
            hidden, model.lm_head.weight, y, chunk_size=7, softcap=model.config.logit_softcap
        )
    )
    torch.testing.assert_close(fused, plain, rtol=1e-6, atol=0)
    assert fused_grads.keys() == plain_grads.keys()
    for name, grad in plain_grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_softcap_bounds_the_logits_of_the_same_weights():
    capped = tiny_model(pos_emb="rope", logit_softcap=0.25)
    uncapped = tiny_model(pos_emb="rope")
    idx = torch.randint(50, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        raw, logits = uncapped(idx), capped(idx)
    assert raw.abs().max() > 0.5  # the cap bites
    assert logits.abs().max() < 0.25
    torch.testing.assert_close(logits, 0.25 * torch.tanh(raw / 0.25))
    torch.testing.assert_close(soft_cap(raw, None), raw)


def test_zero_init_projections_start_each_block_as_the_identity():
    model = tiny_model(pos_emb="rope", zero_init_proj=True)
    projections = [p for block in model.h for p in block.residual_projections()]
    assert len(projections) == 4 and all(torch.count_nonzero(p.weight) == 0 for p in projections)
    assert torch.count_nonzero(model.h[0].attn.c_attn.weight) > 0  # only those
    idx = torch.randint(50, (2, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), model.lm_head(model.ln_f(model.wte(idx))))
    model.train()
    F.cross_entropy(model(idx[:, :-1]).flatten(0, 1), idx[:, 1:].flatten()).backward()
    assert all(torch.count_nonzero(p.weight.grad) > 0 for p in projections)  # they learn


def test_value_embeddings_are_one_table_with_two_mixes_per_layer():
    base, model = tiny_model(), tiny_model(value_embeds=True)
    assert model.num_params() - base.num_params() == 50 * 32 + 2 * 2  # the table and 2 layers' mixes
    assert all(torch.equal(block.attn.ve_mix.detach(), torch.tensor([0.5, 0.5])) for block in model.h)
    hidden, rest = muon_split(model)
    adamw = {id(p) for p in rest}
    assert id(model.wve.weight) in adamw and all(id(b.attn.ve_mix) in adamw for b in model.h)  # not Muon's
    assert len(hidden) == len(muon_split(base)[0])  # the same hidden matrices


def test_qk_norm_normalises_each_heads_queries_and_keys():
    model = tiny_model(qk_norm=True)
    attn = model.h[0].attn
    assert attn.q_norm.weight.shape == (8,) and attn.k_norm.weight.shape == (8,)  # head_dim 32 / 4
    seen = {}
    attn.q_norm.register_forward_hook(lambda m, i, o: seen.setdefault("q", o))
    with torch.no_grad():
        model(torch.randint(50, (1, 10)))
    rms = seen["q"].pow(2).mean(-1).sqrt()  # (B, nh, T): unit RMS per head and token, with the unit gain
    torch.testing.assert_close(rms, torch.ones_like(rms), rtol=1e-3, atol=1e-3)
