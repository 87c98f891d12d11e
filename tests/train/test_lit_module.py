"""GPTLitModule on its own: loss, validation metrics, FLOPs, random streams and checkpoint hooks."""

from __future__ import annotations

import io
import math
import random

import numpy as np
import pytest
import tiktoken
import torch
import torch.nn.functional as F

from gpt.config import ModelConfig, OptimConfig
from gpt.errors import NonFiniteError
from gpt.tokenizer import CharTokenizer, TiktokenTokenizer
from gpt.train.lit_module import GPTLitModule, get_rng_state, set_rng_state, token_byte_lengths
from tests.helpers import CHARS, tiny_config


@pytest.fixture
def module() -> GPTLitModule:
    torch.manual_seed(0)
    tok = CharTokenizer(CHARS)
    return GPTLitModule.from_configs(tiny_config(vocab_size=64), OptimConfig(), tok)


def batch(vocab: int = 58, B: int = 2, T: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(0, vocab, (B, T + 1), generator=torch.Generator().manual_seed(seed))
    return tokens[:, :-1], tokens[:, 1:]


def test_token_byte_lengths_are_utf8_bytes_with_zeros_for_padding():
    lengths = token_byte_lengths(CharTokenizer("aé€😀"), vocab_size=6)
    assert lengths.tolist() == [1.0, 2.0, 3.0, 4.0, 0.0, 0.0]
    enc = tiktoken.get_encoding("r50k_base")
    lengths = token_byte_lengths(TiktokenTokenizer("r50k_base"), vocab_size=50_304)
    expected = [len(enc.decode_single_token_bytes(i)) for i in range(enc.n_vocab)]
    assert lengths.tolist() == expected + [0] * (50_304 - enc.n_vocab)


def test_hparams_are_plain_data(module):
    buffer = io.BytesIO()
    torch.save(dict(module.hparams), buffer)
    buffer.seek(0)
    hparams = torch.load(buffer, weights_only=True)
    assert ModelConfig(**hparams["model"]) == module.model_config
    assert hparams["tokenizer"] == {"kind": "char", "chars": CHARS}


def test_loss_is_the_cross_entropy_of_the_models_logits(module):
    x, y = batch()
    expected = F.cross_entropy(module.model(x).reshape(-1, 64), y.reshape(-1))
    torch.testing.assert_close(module.loss((x, y)), expected, rtol=0, atol=0)


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
