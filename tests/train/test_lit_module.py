"""GPTLitModule on its own: loss, validation metrics, FLOPs, random streams and checkpoint hooks."""

from __future__ import annotations

import io
import math
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gpt.config import DataConfig, ModelConfig, OptimConfig
from gpt.data.pairs import data_format
from gpt.errors import NonFiniteError
from gpt.tokenizer import CharTokenizer, token_byte_lengths
from gpt.train.lit_module import IGNORE, GPTLitModule, get_rng_state, set_rng_state
from tests.helpers import CHARS, tiny_config


@pytest.fixture
def module() -> GPTLitModule:
    torch.manual_seed(0)
    tok = CharTokenizer(CHARS)
    return GPTLitModule.from_configs(tiny_config(vocab_size=64), OptimConfig(), tok)


def batch(vocab: int = 58, B: int = 2, T: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(0, vocab, (B, T + 1), generator=torch.Generator().manual_seed(seed))
    return tokens[:, :-1], tokens[:, 1:]


def test_hparams_are_plain_data(module):
    buffer = io.BytesIO()
    torch.save(dict(module.hparams), buffer)
    buffer.seek(0)
    hparams = torch.load(buffer, weights_only=True)
    assert ModelConfig(**hparams["model"]) == module.model_config
    assert hparams["tokenizer"] == {"kind": "char", "chars": CHARS}


def test_loss_is_the_cross_entropy_of_the_models_logits(module):
    """The fused chunked loss (no (B, T, V) logits) equals the plain logits path, value and gradients."""
    x, y = batch()
    expected = F.cross_entropy(module.model(x).reshape(-1, 64), y.reshape(-1))
    expected_grads = torch.autograd.grad(expected, list(module.parameters()))
    loss = module.loss((x, y))
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=0)
    grads = torch.autograd.grad(loss, list(module.parameters()))
    for (name, _), g, e in zip(module.named_parameters(), grads, expected_grads, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-7, msg=name)


def test_flops_per_batch_is_6n_plus_attention_per_token_and_a_third_without_backward(module):
    module.loss(batch(B=3, T=16))
    n, c = module.model.num_params(), module.model_config
    per_token = 6 * n + 12 * c.n_layer * c.n_embd * 16
    assert module.flops_per_batch == per_token * 3 * 16
    module.eval()
    assert module.flops_per_batch == pytest.approx(per_token * 3 * 16 / 3)


def test_validation_loss_is_the_token_mean_and_bpb_counts_bytes(module):
    logged = {}
    module.log_dict = lambda values, **kwargs: logged.update(values)
    batches = [batch(B=2, seed=1), batch(B=5, seed=2)]  # of different sizes: weighted by tokens
    with torch.no_grad():
        for _ in range(2):  # the sums restart at each validation
            for i, b in enumerate(batches):
                module.validation_step(b, i)
            module.on_validation_epoch_end()
        logits = torch.cat([module.model(x) for x, _ in batches]).reshape(-1, 64)
        expected = F.cross_entropy(logits, torch.cat([y for _, y in batches]).reshape(-1))
    torch.testing.assert_close(logged["val/loss"], expected)
    torch.testing.assert_close(logged["val/ppl"], expected.exp())
    # every character of CHARS is one byte in UTF-8
    torch.testing.assert_close(logged["val/bpb"], expected / math.log(2))


def test_end_of_text_counts_in_the_loss_but_neither_nats_nor_bytes_in_bpb():
    """A model with zero logits puts ln 8 nats on every target; of the 4 targets, end-of-text is
    no text: the loss is ln 8 and bpb the other 3 targets' 3 x 3 bits over their 1 + 2 + 4 bytes."""
    tok = CharTokenizer("aé€😀", eot=True)  # ids 0-3, end-of-text 4; 5-7 pad the vocabulary
    module = GPTLitModule.from_configs(tiny_config(vocab_size=8), OptimConfig(), tok)
    torch.nn.init.zeros_(module.model.lm_head.weight)
    logged = {}
    module.log_dict = lambda values, **kwargs: logged.update({k: float(v) for k, v in values.items()})
    x, y = torch.tensor([[0, 1, 3, 4]]), torch.tensor([[1, 3, 4, 0]])  # é 😀 end-of-text a
    with torch.no_grad():
        module.validation_step((x, y), 0)
        module.on_validation_epoch_end()
    assert logged["val/loss"] == pytest.approx(math.log(8), rel=1e-6)
    assert logged["val/bpb"] == pytest.approx(3 * 3 / (2 + 4 + 1), rel=1e-6)


def draws() -> tuple[list[float], float, list[float]]:
    return torch.rand(3).tolist(), random.random(), np.random.rand(3).tolist()


def test_rng_state_round_trips_every_stream_as_plain_data():
    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    np.random.randn()  # a cached Gaussian is part of numpy's state
    buffer = io.BytesIO()
    torch.save(get_rng_state(), buffer)
    expected = draws()
    buffer.seek(0)
    set_rng_state(torch.load(buffer, weights_only=True))
    assert draws() == expected


def test_checkpoint_hooks_save_and_restore_rng_and_tokens(module):
    module.tokens_seen = 12_345
    checkpoint = {}
    module.on_save_checkpoint(checkpoint)
    assert checkpoint["tokens_seen"] == 12_345
    expected = draws()
    module.tokens_seen = 0
    module.on_load_checkpoint(checkpoint)
    assert module.tokens_seen == 12_345 and draws() == expected
    module.on_load_checkpoint({})  # a checkpoint from before tokens were counted
    assert module.tokens_seen == 0


def test_a_nonfinite_model_is_never_saved(module):
    module.on_save_checkpoint({})  # finite: fine
    with torch.no_grad():
        module.model.lm_head.weight[0, 0] = float("inf")
    with pytest.raises(NonFiniteError, match="refusing to save"):
        module.on_save_checkpoint({})


# ----------------------------------------------------------------------------- example batches


def example_batch(B: int = 2, T: int = 16, seed: int = 0, vocab: int = 58) -> dict[str, torch.Tensor]:
    """Rows of two packed examples and some padding; the first tokens of each example are prompt
    (prefix, no loss), and a random share of the rest is ignored too, so rows count unevenly."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, vocab, (B, T), generator=g)
    targets = torch.randint(0, vocab, (B, T), generator=g)
    positions = torch.zeros(B, T, dtype=torch.long)
    segments = torch.full((B, T), -1, dtype=torch.long)
    prefix = torch.zeros(B, T, dtype=torch.bool)
    for b in range(B):
        first, second = (
            int(torch.randint(3, T // 2, (1,), generator=g)),
            int(torch.randint(2, T // 2, (1,), generator=g)),
        )
        start = 0
        for seg, n in enumerate((first, second)):
            positions[b, start : start + n] = torch.arange(n)
            segments[b, start : start + n] = seg
            prompt = int(torch.randint(1, n, (1,), generator=g))
            prefix[b, start : start + prompt] = True
            targets[b, start : start + prompt - 1] = IGNORE
            start += n
    targets[segments < 0] = IGNORE
    targets[torch.rand(B, T, generator=g) < 0.2] = IGNORE
    step_tokens = torch.full((B,), int((targets != IGNORE).sum()))
    return dict(
        idx=idx,
        targets=targets,
        positions=positions,
        segments=segments,
        prefix=prefix,
        step_tokens=step_tokens,
    )


def rows(batch: dict[str, torch.Tensor], sl: slice, step_tokens: int) -> dict[str, torch.Tensor]:
    out = {k: v[sl] for k, v in batch.items()}
    out["step_tokens"] = torch.full((len(out["idx"]),), step_tokens)
    return out


def attach(module: GPTLitModule, world_size: int = 1, accumulate: int = 1) -> None:
    """A stand-in for the Trainer, with what the loss and the token count read."""
    module.trainer = SimpleNamespace(
        world_size=world_size,
        accumulate_grad_batches=accumulate,
        strategy=SimpleNamespace(reduce=lambda t, reduce_op: t * world_size),  # every rank alike
    )


def big_batch_mean(module: GPTLitModule, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    logits = module.model(batch["idx"], positions=batch["positions"], segments=batch["segments"])
    return F.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten(), ignore_index=IGNORE)


@pytest.mark.parametrize("world_size, accumulate", [(1, 3), (2, 1), (2, 3), (3, 2)])
def test_micro_batches_and_ranks_add_up_to_the_mean_over_the_steps_counted_targets(
    module, world_size, accumulate
):
    """Lightning divides each micro-batch's loss by accumulate_grad_batches, DDP averages the
    gradients over ranks: the step's gradient must be that of one big batch's token mean, however
    unevenly the counted targets fall into the micro-batches (of 2 rows each here)."""
    n = world_size * accumulate
    batch = example_batch(B=2 * n, seed=3)
    counts = (batch["targets"] != IGNORE).view(n, -1).sum(dim=1)  # per micro-batch
    assert len(set(counts.tolist())) > 1  # unevenly spread
    step_tokens = int(counts.sum())
    attach(module, world_size, accumulate)

    expected = big_batch_mean(module, batch)
    expected_grads = torch.autograd.grad(expected, list(module.parameters()))

    module.zero_grad()
    for r in range(n):  # rank r // accumulate, micro-batch r % accumulate
        loss = module.training_step(rows(batch, slice(2 * r, 2 * r + 2), step_tokens), r)
        (loss / accumulate / world_size).backward()  # Lightning's division, then DDP's mean
    for (name, p), g in zip(module.named_parameters(), expected_grads, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-6, atol=1e-6, msg=name)
    # train/loss: the MeanMetric over the step's micro-batches and ranks
    torch.testing.assert_close(module.train_loss.compute(), expected.detach(), rtol=1e-6, atol=1e-6)


def test_ignored_targets_get_no_gradient_and_their_values_do_not_matter(module):
    attach(module)
    batch = example_batch(B=3, seed=4)
    ignored = batch["targets"] == IGNORE
    assert ignored.any() and (~ignored).any()
    hidden = []

    def keep(mod, args, out) -> None:
        out.retain_grad()
        hidden.append(out)

    # The loss applies lm_head's weight chunk by chunk to the final hidden states (ln_f's output):
    # an ignored target's row of the gradient, and so its hidden state's, is exactly zero.
    hook = module.model.ln_f.register_forward_hook(keep)
    loss = module.step_loss(batch)
    loss.backward()
    hook.remove()
    grad = hidden[0].grad  # (B, T, C)
    assert torch.equal(grad[ignored], torch.zeros_like(grad[ignored]))
    assert (grad[~ignored].abs().sum(-1) > 0).all()
    # The loss is the sum over the counted targets only, over step_tokens.
    with torch.no_grad():
        logits = module.model.lm_head(hidden[0])
        counted = F.cross_entropy(logits[~ignored], batch["targets"][~ignored], reduction="sum")
    torch.testing.assert_close(loss.detach(), counted / batch["step_tokens"][0], rtol=1e-6, atol=0)


def test_a_step_without_counted_targets_has_zero_loss_not_nan(module):
    attach(module)
    batch = example_batch(seed=5)
    batch["targets"][:] = IGNORE
    batch["step_tokens"][:] = 0
    assert module.step_loss(batch).item() == 0.0


def test_tokens_seen_counts_the_non_padding_tokens_of_every_rank(module):
    attach(module, world_size=2)
    batches = [example_batch(seed=6), example_batch(seed=7)]
    for i, b in enumerate(batches):
        module.training_step(b, i)
    assert module.tokens_seen == 0  # summed over ranks once per optimizer step
    module.count_pending_tokens()
    assert module.tokens_seen == 2 * sum(int((b["segments"] >= 0).sum()) for b in batches)
    module.count_pending_tokens()  # nothing new
    assert module.tokens_seen == 2 * sum(int((b["segments"] >= 0).sum()) for b in batches)


def test_validation_of_examples_counts_only_the_counted_targets_and_bpb_only_their_text():
    torch.manual_seed(0)
    tok = CharTokenizer("aé€😀bcd", eot=True)  # 1 to 4 bytes a character; end-of-text is 0 bytes
    module = GPTLitModule.from_configs(tiny_config(vocab_size=8), OptimConfig(), tok)
    logged = {}
    module.log_dict = lambda values, **kwargs: logged.update(values)
    batches = [example_batch(B=2, seed=8, vocab=8), example_batch(B=3, seed=9, vocab=8)]
    with torch.no_grad():
        for i, b in enumerate(batches):
            module.validation_step(b, i)
        module.on_validation_epoch_end()
        nats, tokens, text_nats, n_bytes = 0.0, 0, 0.0, 0
        lengths = token_byte_lengths(tok, 8)
        for b in batches:
            counted = b["targets"] != IGNORE
            text = counted & (b["targets"] != tok.eot_token)
            assert (counted & ~text).any()  # some counted targets are end-of-text
            logits = module.model(b["idx"], positions=b["positions"], segments=b["segments"])
            nats += F.cross_entropy(logits[counted], b["targets"][counted], reduction="sum")
            tokens += int(counted.sum())
            text_nats += F.cross_entropy(logits[text], b["targets"][text], reduction="sum")
            n_bytes += float(lengths[b["targets"][text]].sum())
    torch.testing.assert_close(logged["val/loss"], nats / tokens)
    torch.testing.assert_close(logged["val/ppl"], (nats / tokens).exp())
    torch.testing.assert_close(logged["val/bpb"], text_nats / (math.log(2) * n_bytes))


def test_data_format_is_a_plain_hyperparameter():
    fmt = data_format(DataConfig(source="pairs", path="pairs.jsonl"))  # the plain template
    module = GPTLitModule.from_configs(tiny_config(vocab_size=64), OptimConfig(), CharTokenizer(CHARS), fmt)
    buffer = io.BytesIO()
    torch.save(dict(module.hparams), buffer)
    buffer.seek(0)
    assert torch.load(buffer, weights_only=True)["data_format"] == fmt
    plain = GPTLitModule.from_configs(tiny_config(vocab_size=64), OptimConfig(), CharTokenizer(CHARS))
    assert plain.hparams["data_format"] is None


def test_the_data_config_is_a_plain_hyperparameter():
    data = DataConfig(source="text", path="corpus.txt", val_windows=32)
    module = GPTLitModule.from_configs(
        tiny_config(vocab_size=64), OptimConfig(), CharTokenizer(CHARS), data=data
    )
    buffer = io.BytesIO()
    torch.save(dict(module.hparams), buffer)
    buffer.seek(0)
    assert DataConfig(**torch.load(buffer, weights_only=True)["data"]) == data
    plain = GPTLitModule.from_configs(tiny_config(vocab_size=64), OptimConfig(), CharTokenizer(CHARS))
    assert plain.hparams["data"] is None
