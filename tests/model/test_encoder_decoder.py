"""The encoder-decoder (model.arch=encoder_decoder): packed examples give the loss and gradients they
would alone, the encoder reads both ways and the decoder causally, cached generation equals the
uncached reference, batched rows of different source lengths equal each row alone, tied embeddings
are one matrix. Its training, resume, DDP and commands: tests/commands/test_seq2seq_e2e.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gpt.data.pairs import TokenizedExamples
from gpt.data.pairs_datamodule import IGNORE, Packing, build_row
from gpt.generate.text import left_pad
from gpt.generate.tokens import Context, beam_search, generate
from gpt.model.encoder_decoder import EncoderDecoder
from tests.helpers import tiny_model

POS_EMBS = ["learned", "sinusoidal", "rope"]
VOCAB = 50
START = VOCAB - 1  # the decoder's start token (train.py: the end-of-text token)


def seq2seq(**overrides) -> EncoderDecoder:
    """A tiny encoder-decoder (2 + 2 layers, 32 wide, block 32), random weights; lively (a large init,
    so greedy tokens vary) unless init_std is given."""
    config = dict(arch="encoder_decoder", decoder_start=START, init_std=0.5) | overrides
    return tiny_model(**config)


def examples(shapes: list[tuple[int, int]], seed: int = 0) -> TokenizedExamples:
    """Examples of (source, target) lengths: random ids, the target's flagged as completion."""
    rng = np.random.default_rng(seed)
    ids = [rng.integers(0, VOCAB - 1, s + t) for s, t in shapes]
    completion = [np.arange(s + t) >= s for s, t in shapes]
    lengths = [s + t for s, t in shapes]
    return TokenizedExamples(
        ids=np.concatenate(ids),
        completion=np.concatenate(completion),
        offsets=np.concatenate([[0], np.cumsum(lengths)]),
        index=np.arange(len(shapes)),
    )


def batch_of(rows: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.stack([r[k] for r in rows])) for k in rows[0]}


def summed_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    logits = model(
        batch["idx"],
        positions=batch["positions"],
        segments=batch["segments"],
        source=batch["source"],
        source_positions=batch["source_positions"],
        source_segments=batch["source_segments"],
    )
    return F.cross_entropy(
        logits.flatten(0, 1), batch["targets"].flatten(), reduction="sum", ignore_index=IGNORE
    )


# ----------------------------------------------------------------------------- training rows


def test_rows_put_the_source_on_its_side_and_the_target_after_the_start_token():
    ex = examples([(3, 2), (1, 4)])  # the targets' last token stands for end-of-text
    row = build_row(ex, np.array([0, 1]), 8, mask_prompt=True, decoder_start=START)
    ids = ex.ids.tolist()
    assert row["source"][:4].tolist() == ids[0:3] + ids[5:6]
    assert row["source_segments"].tolist() == [0, 0, 0, 1, -1, -1, -1, -1]
    assert row["source_positions"][:4].tolist() == [0, 1, 2, 0]
    assert row["idx"][:6].tolist() == [START, ids[3], START, *ids[6:9]]
    assert row["targets"].tolist() == ids[3:5] + ids[6:10] + [IGNORE] * 2
    assert row["segments"].tolist() == [0, 0, 1, 1, 1, 1, -1, -1]
    assert row["positions"][:6].tolist() == [0, 1, 0, 1, 2, 3]


def test_a_chat_keeps_its_earlier_turns_in_the_source_and_an_empty_prompt_reads_the_start_token():
    ex = examples([(2, 3), (0, 2)])
    ex.completion[1] = True  # example 0: prompt, a trained token, prompt, then its last segment
    ex.completion[2] = False
    ex = TokenizedExamples(ex.ids, ex.completion, ex.offsets, ex.index)
    assert ex.source_lengths.tolist() == [3, 0]
    row = build_row(ex, np.array([0, 1]), 8, mask_prompt=True, decoder_start=START)
    assert row["source"][:4].tolist() == [*ex.ids[:3].tolist(), START]
    assert (row["targets"] != IGNORE).sum() == 2 + 2


def test_packing_counts_the_targets_and_fits_both_sides():
    ex = examples([(3, 2), (1, 4), (6, 1), (2, 2), (5, 5)], seed=1)
    packing = Packing(ex, block_size=8, mask_prompt=True, packed=True, seed=0, seq2seq=True)
    assert packing.targets_per_epoch == 2 + 4 + 1 + 2 + 5
    epoch = packing.epoch(0)
    total = 0
    for j in range(packing.n_rows):
        row = build_row(ex, packing.members(epoch, j), 8, True, START)
        total += int((row["targets"] != IGNORE).sum())
    assert total == packing.targets_per_epoch


# ----------------------------------------------------------------------------- packed == alone


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("pos_emb", POS_EMBS)
def test_packed_examples_give_the_loss_and_gradients_they_would_alone(pos_emb, tie):
    model = seq2seq(pos_emb=pos_emb, tie_embeddings=tie, init_std=0.02).train()  # dropout 0
    ex = examples([(5, 3), (2, 6), (9, 4), (1, 1), (7, 7)], seed=2)
    width = 16
    packed = batch_of([build_row(ex, np.array(m), width, True, START) for m in ([0, 1, 2], [3, 4])])
    assert (packed["source_segments"] < 0).any() and (packed["segments"] < 0).any()  # padding on both
    loss = summed_loss(model, packed)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    alone = sum(
        summed_loss(model, batch_of([build_row(ex, np.array([i]), width, True, START)])) for i in range(5)
    )
    alone_grads = torch.autograd.grad(alone, list(model.parameters()))
    torch.testing.assert_close(loss, alone, rtol=1e-6, atol=0)
    for (name, _), a, b in zip(model.named_parameters(), grads, alone_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("pos_emb", POS_EMBS)
def test_the_encoder_reads_both_ways_and_the_decoder_causally(pos_emb):
    model = seq2seq(pos_emb=pos_emb)
    g = torch.Generator().manual_seed(3)
    source, target = torch.randint(VOCAB, (1, 8), generator=g), torch.randint(VOCAB, (1, 6), generator=g)
    with torch.no_grad():
        memory = model.encode(source)
        changed = source.clone()
        changed[0, -1] = (changed[0, -1] + 1) % VOCAB
        assert not torch.allclose(model.encode(changed)[:, 0], memory[:, 0])  # the first slot sees the last
        logits = model(target, source=source)
        later = target.clone()
        later[0, -1] = (later[0, -1] + 1) % VOCAB
        torch.testing.assert_close(model(later, source=source)[:, :-1], logits[:, :-1], rtol=0, atol=0)
        assert not torch.allclose(
            model(target, source=changed), logits
        )  # every target token reads the source


def test_tied_embeddings_are_one_matrix_for_encoder_decoder_and_head():
    tied, untied = seq2seq(), seq2seq(tie_embeddings=False)
    assert tied.lm_head.weight is tied.wte.weight and not hasattr(tied, "enc_wte")
    names = dict(untied.named_parameters())
    assert {"enc_wte.weight", "wte.weight", "lm_head.weight"} <= names.keys()
    assert untied.num_params() - tied.num_params() == 2 * VOCAB * 32
    assert tied.num_params() < sum(p.numel() for p in tied.parameters()) + 1  # positions apart
    learned = seq2seq(pos_emb="learned")
    assert learned.num_params(exclude_positions=False) - learned.num_params() == 2 * 32 * 32  # two tables


# ----------------------------------------------------------------------------- generation


@pytest.mark.parametrize("pos_emb", POS_EMBS)
@pytest.mark.parametrize("source_len", [1, 7, 40])
def test_cached_logits_equal_uncached_at_every_step(pos_emb, source_len):
    """50 steps on a 32-token block: the decoder's window slides (and a 40-token source is cropped).
    Logits with GPT-2's init (of order 1); greedy tokens with a lively model, whose tokens vary."""
    model = seq2seq(pos_emb=pos_emb, init_std=0.02)
    source = torch.randint(VOCAB, (2, source_len), generator=torch.Generator().manual_seed(source_len))
    with torch.no_grad():
        cached, uncached = Context(model, source, None, 50), Context(model, source, None, 50, use_cache=False)
        for _ in range(50):
            torch.testing.assert_close(cached.logits, uncached.logits, rtol=0, atol=1e-5)
            token = uncached.logits.argmax(-1)
            cached.append(token), uncached.append(token)
    lively = seq2seq(pos_emb=pos_emb)
    greedy = [
        torch.stack(list(generate(lively, source, 50, temperature=0, use_cache=c))) for c in (True, False)
    ]
    assert torch.equal(*greedy) and len(greedy[0].unique()) > 3


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("pos_emb", POS_EMBS)
def test_batched_rows_with_different_source_lengths_equal_each_alone(pos_emb, use_cache):
    model = seq2seq(pos_emb=pos_emb)
    g = torch.Generator().manual_seed(4)
    rows = [torch.randint(VOCAB, (n,), generator=g).tolist() for n in (3, 11, 1, 6)]
    padded, lengths = left_pad(rows)
    batched = torch.stack(
        list(generate(model, padded, 20, lengths=lengths, temperature=0, use_cache=use_cache)), 1
    )
    for i, row in enumerate(rows):
        alone = torch.stack(list(generate(model, torch.tensor([row]), 20, temperature=0)), 1)
        assert torch.equal(batched[i], alone[0]), i


def test_sampling_and_beam_search_cached_equal_uncached():
    model = seq2seq(pos_emb="rope")
    source = torch.randint(VOCAB, (1, 9), generator=torch.Generator().manual_seed(5))
    drawn = [
        torch.stack(
            list(generate(model, source, 30, generator=torch.Generator().manual_seed(0), use_cache=c))
        )
        for c in (True, False)
    ]
    assert torch.equal(*drawn)
    beams = [beam_search(model, source, 30, num_beams=3, eot_token=START, use_cache=c) for c in (True, False)]
    assert beams[0] == beams[1] and len(beams[0]) > 0


@pytest.mark.parametrize(
    "pos_emb", ["rope", *(pytest.param(p, marks=pytest.mark.slow) for p in POS_EMBS if p != "rope")]
)  # each trace takes seconds: one in the default run
def test_compiled_decode_step_traces_once_and_matches_eager(pos_emb):
    """Dynamo's trace with the eager backend: one graph for every step and slide, the source in the cache."""
    model = seq2seq(pos_emb=pos_emb)
    rows = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10]]
    padded, lengths = left_pad(rows)
    expected = torch.stack(list(generate(model, padded, 40, lengths=lengths, temperature=0)), 1)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled = list(generate(model, padded, 40, lengths=lengths, temperature=0, compile="eager"))
    assert torch.equal(torch.stack(compiled, 1), expected)


def test_an_encoder_decoder_needs_a_source():
    model = seq2seq()
    with pytest.raises(ValueError, match="needs a source"):
        model(torch.zeros(1, 3, dtype=torch.long))


def test_a_batch_cuts_its_source_after_the_last_column_in_use_and_the_loss_stays():
    from gpt.data.pairs_datamodule import trim_source

    model = seq2seq(init_std=0.02)
    ex = examples([(2, 9), (3, 12), (1, 5), (4, 8)], seed=6)
    rows = [build_row(ex, np.array(m), 32, True, START) for m in ([0, 1], [2, 3])]
    full = batch_of(rows)
    trimmed = trim_source([{k: torch.from_numpy(v) for k, v in r.items()} for r in rows])
    assert trimmed["source"].shape == (2, 5) and full["source"].shape == (2, 32)  # 2 + 3 source tokens
    assert torch.equal(trimmed["idx"], full["idx"]) and torch.equal(trimmed["source"], full["source"][:, :5])
    with torch.no_grad():
        torch.testing.assert_close(summed_loss(model, trimmed), summed_loss(model, full), rtol=1e-6, atol=0)
