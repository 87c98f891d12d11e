"""A tiny model overfit on a handful of pairs, so that what greedy decoding says is known: the
reference of every training pair."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gpt.config import DataConfig
from gpt.data.pairs import Example, encode_example, row_example
from gpt.model.transformer import GPT
from gpt.templates import get_template
from gpt.tokenizer import CharTokenizer
from tests.helpers import tiny_config

# Reverse the letters: a rule the model cannot guess, so it must learn each pair.
PAIRS = [("ab", "ba"), ("abc", "cba"), ("ca", "ac"), ("bca", "acb"), ("cab", "bac")]


def pair_examples(pairs=PAIRS, template: str = "plain") -> list[Example]:
    names = {n: n for n in ("prompt", "completion", "messages", "instruction", "output", "source", "target")}
    return [
        row_example({"prompt": p, "completion": c}, names, get_template(template), f"pairs.jsonl:{i}")
        for i, (p, c) in enumerate(pairs, 1)
    ]


def overfit(steps: int = 150, seed: int = 0) -> tuple[GPT, CharTokenizer]:
    """A 2-layer model trained on PAIRS (plain template) until greedy decoding repeats them (it does
    after about 60 steps): two seconds on one CPU thread, where several threads only contend."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _overfit(steps, seed)
    finally:
        torch.set_num_threads(threads)


def _overfit(steps: int, seed: int) -> tuple[GPT, CharTokenizer]:
    tok = CharTokenizer("\nabc", eot=True)
    torch.manual_seed(seed)
    model = GPT(tiny_config(vocab_size=tok.vocab_size, block_size=16))
    encoded = [encode_example(e, tok) for e in pair_examples()]
    width = max(len(ids) for ids, _ in encoded)
    x = torch.zeros(len(encoded), width - 1, dtype=torch.long)
    y = torch.full((len(encoded), width - 1), -100, dtype=torch.long)  # ignored: prompts and padding
    for row, (ids, completion) in enumerate(encoded):
        ids_t = torch.from_numpy(ids)
        n = len(ids) - 1
        x[row, :n] = ids_t[:-1]
        y[row, :n] = torch.where(torch.from_numpy(completion[1:]), ids_t[1:], -100)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten(), ignore_index=-100)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval(), tok


@pytest.fixture(scope="session")
def overfit_model() -> tuple[GPT, CharTokenizer]:
    return overfit()


@pytest.fixture
def data_cfg(tmp_path) -> DataConfig:
    return DataConfig(source="pairs", path=str(tmp_path / "pairs.jsonl"))
