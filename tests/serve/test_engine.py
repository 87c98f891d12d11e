"""The continuous-batching engine against generate_text, the reference: each request gets what it
would get alone, whatever runs beside it, whenever it joins, and however its row slides."""

from __future__ import annotations

import threading

import pytest
import torch

from gpt.config import SamplingConfig
from gpt.generate.text import generate_text
from gpt.serve.engine import Engine, QueueFull, Request
from gpt.tokenizer import CharTokenizer
from tests.helpers import tiny_model

TOKENIZER = CharTokenizer(sorted(set("abcdefghijklmnopqrstuvwxyz ,.\n")), eot=True)


@pytest.fixture(scope="module")
def model():
    return tiny_model(vocab_size=TOKENIZER.vocab_size, block_size=32).eval()


class Collect:
    """A request's on_text: its pieces, and an event set at its finish."""

    def __init__(self) -> None:
        self.pieces: list[str] = []
        self.finish: str | None = None
        self.done = threading.Event()

    def __call__(self, piece: str, finish: str | None) -> None:
        self.pieces.append(piece)
        if finish is not None:
            self.finish = finish
            self.done.set()

    @property
    def text(self) -> str:
        return "".join(self.pieces)


# 8 requests: prompts of 1 to 64 characters (longer than block_size 32: cropped), greedy and sampled
# with their own settings and seeds, up to 80 new tokens (rows slide past block_size), a stop string.
CASES = [
    ("hello", 40, dict(temperature=0.0), []),
    ("a", 70, dict(temperature=0.9, top_k=5), []),
    ("the quick brown fox jumps over the lazy dog, twice over the lazy dog", 25, dict(temperature=0.0), []),
    ("xyz", 60, dict(temperature=1.0, top_p=0.8), []),
    ("abc def", 9, dict(temperature=0.0), ["e"]),
    ("q", 80, dict(temperature=0.7), []),
    ("zz top", 33, dict(temperature=0.0), []),
    ("mm", 50, dict(temperature=1.2, top_k=3), ["q"]),
]


def reference(model, seed: int, prompt: str, max_tokens: int, settings: dict, stop: list[str]) -> str:
    return generate_text(model, TOKENIZER, prompt, max_tokens, seed=seed, stop=stop, **settings)


@pytest.mark.parametrize("max_batch", [1, 3, 8])
def test_each_request_gets_what_it_would_alone(model, max_batch):
    engine = Engine(model, TOKENIZER, max_batch=max_batch, max_queue=len(CASES))
    try:
        collected = []
        for seed, (prompt, max_tokens, settings, stop) in enumerate(CASES):
            collect = Collect()
            request = Request(
                TOKENIZER.encode(prompt), max_tokens, collect, SamplingConfig(**settings), seed, stop
            )
            engine.submit(request)
            collected.append(collect)
        for collect in collected:
            assert collect.done.wait(60)
        for seed, (collect, case) in enumerate(zip(collected, CASES, strict=True)):
            assert collect.text == reference(model, seed, *case), case
        assert {c.finish for c in collected} == {"length", "stop"}
        assert engine.active == 0 and engine.queued == 0
    finally:
        engine.close()


def test_the_padding_every_row_shares_is_dropped_and_the_answers_stay_the_same(model):
    """A request that joins late is left-padded up to the cache's position; once the rows before it
    have left, attention would go on reading that padding at every step: the rows move left."""
    engine = Engine(model, TOKENIZER, max_batch=2, start=False)
    first, second = Collect(), Collect()
    greedy = SamplingConfig(temperature=0.0)
    engine.submit(Request(TOKENIZER.encode("hello"), 20, first, greedy))
    after_first = []  # (cache position, the second row's padding) at each step once the first left
    with torch.inference_mode():
        for _ in range(16):
            engine.step()
        engine.submit(Request(TOKENIZER.encode("abc def"), 14, second, greedy))
        engine.step()
        assert engine.rows[1] is not None and int(engine.pad[1]) > 0  # joined at the position, padded
        while not second.done.is_set():
            engine.step()
            if first.done.is_set() and engine.active:
                after_first.append((int(engine.cache.pos), int(engine.pad[1])))
    assert after_first and all(pad == 0 for _, pad in after_first)
    # The position is the second row's length: the prompt's 7 tokens and its answer so far, less one.
    assert [pos for pos, _ in after_first] == list(
        range(after_first[0][0], after_first[0][0] + len(after_first))
    )
    assert first.text == reference(model, 0, "hello", 20, dict(temperature=0.0), [])
    assert second.text == reference(model, 0, "abc def", 14, dict(temperature=0.0), [])


def test_a_cancelled_request_leaves_within_a_step_and_the_queue_is_bounded(model):
    engine = Engine(model, TOKENIZER, max_batch=1, max_queue=1)
    try:
        first, second = Collect(), Collect()
        started = threading.Event()

        def on_first(piece: str, finish: str | None) -> None:
            first(piece, finish)
            started.set()

        # greedy: this model repeats "r" for ever (sampled, it may end at any step)
        long = Request(TOKENIZER.encode("a"), 10_000, on_first, SamplingConfig(temperature=0.0))
        engine.submit(long)
        assert started.wait(30)
        engine.submit(Request(TOKENIZER.encode("b"), 5, second, SamplingConfig(temperature=0.0)))
        with pytest.raises(QueueFull):  # one runs, one waits: a third is refused
            engine.submit(Request(TOKENIZER.encode("c"), 5, Collect()))
        long.cancel()
        assert first.done.wait(30) and first.finish == "cancelled"
        assert second.done.wait(30) and second.text == reference(model, 0, "b", 5, {"temperature": 0.0}, [])
        assert len(first.pieces) < 10_000
        assert engine.active == 0
    finally:
        engine.close()


def test_the_rows_are_computed_on_the_models_dtype(model):
    engine = Engine(model, TOKENIZER, max_batch=2)
    try:
        assert engine.cache.k[0].dtype == torch.float32 and engine.cache.k[0].shape[0] == 2
    finally:
        engine.close()


def test_a_failing_step_ends_every_request_with_an_error_and_the_engine_goes_on(model, capsys):
    engine = Engine(model, TOKENIZER, max_batch=2)
    try:
        broken, collect = Collect(), Collect()
        step = engine.step

        def fail_once() -> None:
            engine.step = step
            raise RuntimeError("a bug")

        engine.step = fail_once
        engine.submit(Request(TOKENIZER.encode("a"), 5, broken))
        assert broken.done.wait(30) and broken.finish == "error"
        engine.submit(Request(TOKENIZER.encode("b"), 5, collect, SamplingConfig(temperature=0.0)))
        assert collect.done.wait(30)
        assert collect.text == reference(model, 0, "b", 5, {"temperature": 0.0}, [])
        assert engine.active == 0
    finally:
        engine.close()
    assert "RuntimeError: a bug" in capsys.readouterr().err
