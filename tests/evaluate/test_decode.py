"""Evaluation by generation, in the library: the examples, each decoding method against the
generation functions it uses, and a model whose greedy answers are known."""

from __future__ import annotations

import pytest

from gpt.config import DecodeConfig
from gpt.data.pairs import encode_example
from gpt.errors import ConfigError, UserError
from gpt.evaluate.decode import default_max_new_tokens, evaluate, generate_ids
from gpt.evaluate.examples import EvalExample, encode_examples, example_from_tokens
from gpt.generate.text import generate_text
from gpt.tokenizer import CharTokenizer
from tests.evaluate.conftest import PAIRS, pair_examples
from tests.helpers import tiny_model


def test_examples_hold_the_formatted_prompt_and_the_reference():
    tok = CharTokenizer("\nabc", eot=True)
    first = encode_examples(
        pair_examples(template="Q: {prompt}\\nA: "), CharTokenizer("\n :AQabc", eot=True)
    )[0]
    assert (first.prompt, first.reference, first.where) == ("Q: ab\nA: ", "ba", "pairs.jsonl:1")
    examples = encode_examples(pair_examples(), tok)
    assert examples[0] == EvalExample([1, 2, 0], "ba", [2, 1], "pairs.jsonl:1", "ab\n")


def test_an_example_encoded_for_training_gives_the_same_eval_example():
    """The held-out val examples of a pairs run are token ids and a completion mask."""
    tok = CharTokenizer("\nabc", eot=True)
    for example, expected in zip(pair_examples(), encode_examples(pair_examples(), tok), strict=True):
        ids, completion = encode_example(example, tok)
        assert example_from_tokens(ids, completion, tok, example.where) == expected


def test_rows_the_tokenizer_cannot_encode_are_refused_by_row():
    tok = CharTokenizer("\nabc", eot=True)
    with pytest.raises(UserError, match=r"^pairs.jsonl:1: the completion: character 'z' \(U\+007A\) is not"):
        encode_examples(pair_examples([("ab", "bz")]), tok)
    with pytest.raises(UserError, match=r"^pairs.jsonl:1: its prompt is empty"):
        encode_examples(pair_examples([("", "ab")], template="none"), tok)


def test_settings_are_checked():
    with pytest.raises(
        ConfigError, match="'topk' is not a decoding method; choose among greedy, beam, sampled"
    ):
        DecodeConfig(methods=["greedy", "topk"])
    with pytest.raises(ConfigError, match="num_beams=0 must be >= 1"):
        DecodeConfig(num_beams=0)
    assert DecodeConfig(methods=["beam", "greedy", "beam"]).methods == ["beam", "greedy"]


def test_max_new_tokens_fits_the_longest_reference_with_a_margin():
    def examples(*lengths):
        return [EvalExample([0], "", [1] * n) for n in lengths]

    assert default_max_new_tokens(examples(2, 5), block_size=256) == 5 + 8
    assert default_max_new_tokens(examples(100), block_size=256) == 125
    assert default_max_new_tokens(examples(300), block_size=256) == 256


def test_a_model_overfit_on_pairs_answers_them_with_every_method(overfit_model):
    model, tok = overfit_model
    model.train()
    settings = DecodeConfig(methods=["greedy", "beam", "sampled"], batch_size=2, num_beams=3)
    metrics, records = evaluate(model, tok, encode_examples(pair_examples(), tok), settings)
    assert model.training  # put back as it was
    perfect = {"exact_match": 100.0, "token_accuracy": 100.0, "chrf": 100.0}
    for method in settings.methods:
        assert {k: v for k, v in metrics[method].items() if k != "bleu"} == perfect, method
    assert records[1] == {
        "where": "pairs.jsonl:2",
        "prompt": "abc\n",
        "reference": "cba",
        **{m: "cba" for m in settings.methods},
        **{f"{m}_match": True for m in settings.methods},
    }
    # Wrong references: each method scores the same outputs against them.
    wrong = [(p, c if i % 2 else c[::-1]) for i, (p, c) in enumerate(PAIRS)]  # 2 of 5 stay right
    metrics, records = evaluate(model, tok, encode_examples(pair_examples(wrong), tok), settings)
    assert metrics["greedy"]["exact_match"] == 40.0
    assert [r["greedy"] for r in records] == [c for _, c in PAIRS]


@pytest.fixture
def random_model():
    """Random weights with a large init: varied, long outputs (no end-of-text token to stop them)."""
    tok = CharTokenizer("\nabcdefgh ")
    return tiny_model(vocab_size=tok.vocab_size, init_std=0.5), tok


def prompts_of(tok, texts):
    return [EvalExample(tok.encode(t), "", [], prompt=t) for t in texts]


def test_batches_are_left_padded_and_give_what_each_prompt_gives_alone(random_model):
    """Greedy over batches of prompts of different lengths is generate_text's greedy on each
    prompt alone; beam is generate_text's beam search."""
    model, tok = random_model
    texts = ["a", "abc def", "hh", "bad cafe\n"]
    examples = prompts_of(tok, texts)
    settings = DecodeConfig(batch_size=3)
    greedy = generate_ids(model, tok, examples, "greedy", settings, max_new_tokens=10)
    assert [len(ids) for ids in greedy] == [10] * 4  # no end-of-text: max_new_tokens each
    assert [tok.decode(ids) for ids in greedy] == [
        generate_text(model, tok, t, 10, temperature=0) for t in texts
    ]
    assert generate_ids(model, tok, examples, "greedy", DecodeConfig(batch_size=1), 10) == greedy
    beam = generate_ids(model, tok, examples[:2], "beam", DecodeConfig(num_beams=3, length_penalty=0.5), 6)
    assert [tok.decode(ids) for ids in beam] == [
        generate_text(model, tok, t, 6, num_beams=3, length_penalty=0.5) for t in texts[:2]
    ]


def test_sampling_is_seeded(random_model):
    model, tok = random_model
    examples = prompts_of(tok, ["a", "abc", "h"])

    def sampled(**settings):
        return generate_ids(model, tok, examples, "sampled", DecodeConfig(temperature=1.5, **settings), 12)

    assert sampled(seed=1) == sampled(seed=1)
    assert sampled(seed=1) != sampled(seed=2)
    assert sampled(seed=1) != generate_ids(model, tok, examples, "greedy", DecodeConfig(), 12)
