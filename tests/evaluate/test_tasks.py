"""The task API evaluate.py and callbacks.evaluate share (gpt.evaluate.tasks): the checkpoint's
template, scores that add up over shares of the examples, the model left in its mode."""

from __future__ import annotations

from dataclasses import asdict

import pytest

from gpt.config import DecodeConfig
from gpt.evaluate.choice import ChoiceExample
from gpt.evaluate.examples import encode_examples
from gpt.evaluate.tasks import additive, prompt_template, score, task_metrics
from gpt.templates import get_template
from gpt.tokenizer import CharTokenizer
from tests.evaluate.conftest import pair_examples
from tests.helpers import tiny_model


def test_checkpoint_takes_the_saved_template_else_plain():
    alpaca = {"template": "alpaca", **asdict(get_template("alpaca"))}
    assert prompt_template("checkpoint", alpaca) == (get_template("alpaca"), "alpaca (the checkpoint's)")
    assert prompt_template("checkpoint", None) == (get_template("plain"), "plain (the checkpoint saved none)")
    assert prompt_template("chatml", alpaca) == (get_template("chatml"), "chatml")


def test_generate_scores_are_its_metrics_and_the_model_keeps_its_mode(overfit_model):
    model, tok = overfit_model
    examples = encode_examples(pair_examples(), tok)
    model.train()
    try:
        scored = score("generate", model, tok, examples, DecodeConfig(max_new_tokens=4))
        assert model.training
    finally:
        model.eval()
    assert not additive("generate")
    assert task_metrics("generate", scored.sums) == scored.sums
    assert scored.sums["greedy/exact_match"] == 100.0  # the model repeats its training pairs
    assert len(scored.records) == len(examples)


@pytest.mark.parametrize("split", [1, 2, 3])
def test_choice_sums_over_shares_give_the_metrics_of_the_whole(split):
    """As callbacks.evaluate adds up its ranks' shares: the sums, then the metrics."""
    tok = CharTokenizer(" abcQ?", eot=True)
    model = tiny_model(vocab_size=tok.vocab_size)
    examples = [ChoiceExample("Q?", ("a", "bb", "c"), 2), ChoiceExample("Q ", ("ab", "ca"), 0)] * 2
    whole = score("mc", model, tok, examples, DecodeConfig(batch_size=2))
    shares = [score("mc", model, tok, examples[r::split], DecodeConfig()).sums for r in range(split)]
    summed = {k: sum(s[k] for s in shares) for k in whole.sums}
    assert additive("mc") and summed == whole.sums
    assert task_metrics("mc", summed) == task_metrics("mc", whole.sums)
    assert set(task_metrics("mc", summed)) == {"acc", "acc_norm"}
    assert [r["where"] for r in whole.records] == [e.where for e in examples]
