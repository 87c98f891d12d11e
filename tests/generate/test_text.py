import pytest
import torch

from gpt.config import SamplingConfig
from gpt.errors import ConfigError
from gpt.generate.text import TextStream, generate_text, held_back
from gpt.tokenizer import CharTokenizer, TiktokenTokenizer
from tests.helpers import CHARS, tiny_model


@pytest.fixture(scope="module")
def char_model():
    tok = CharTokenizer(CHARS)
    return tiny_model(vocab_size=tok.vocab_size, init_std=0.5), tok


def stream(tokenizer, ids, stop=()):
    """Push ids one by one; the pieces released after each push, and the final text."""
    s = TextStream(tokenizer, stop)
    pieces = [s.push(i) for i in ids] + [s.flush()]
    return pieces, s.text


def test_held_back_is_the_longest_end_that_starts_a_stop_string():
    assert held_back("hello wo", ["world"]) == 2
    assert held_back("hello w", ["world", "w"]) == 1  # a complete stop string is found, not held
    assert held_back("hello", ["world"]) == 0
    assert held_back("ab", ["abc", "bcd"]) == 2


def test_stop_string_split_across_tokens_is_cut_exactly_and_never_shown():
    tok = CharTokenizer(CHARS)
    pieces, text = stream(tok, tok.encode("To be, or not to be"), stop=["or not"])
    assert text == "To be, " and "".join(pieces) == text
    # "o" waits for the next character; "o", "or", "or " ... are held while they could still grow
    # into the stop string
    assert pieces[:9] == ["T", "", "o ", "b", "e", ",", " ", "", ""]
    # a false start is released as soon as it stops matching
    pieces, text = stream(tok, tok.encode("or nothing"), stop=["or now"])
    assert text == "or nothing" and pieces[:6] == ["", "", "", "", "", "or not"]


def test_earliest_of_several_stop_strings_wins():
    tok = CharTokenizer(CHARS)
    _, text = stream(tok, tok.encode("abc XYZ def UVW"), stop=["UVW", "XYZ"])
    assert text == "abc "


def test_bpe_stream_never_splits_a_character_and_cuts_at_a_multi_token_stop():
    tok = TiktokenTokenizer("r50k_base")
    text = "héllo wörld 🙂 世界, done"
    ids = tok.encode(text)
    pieces, out = stream(tok, ids)
    assert out == text and "".join(pieces) == text and "\ufffd" not in "".join(pieces)
    assert len(ids) > len(pieces[-1])  # streamed, not all at the end
    pieces, out = stream(tok, ids, stop=["🙂 世"])
    assert out == "héllo wörld " and "".join(pieces) == out


def test_end_of_text_ends_the_row():
    tok = TiktokenTokenizer("r50k_base")
    ids = tok.encode("first") + [tok.eot_token] + tok.encode(" second")
    pieces, out = stream(tok, ids)
    assert out == "first" and "".join(pieces) == "first"


def test_stop_sequence_cut_exact_in_generated_text(char_model):
    model, tok = char_model
    full = generate_text(model, tok, "ROMEO:", 60, temperature=0)
    stop = full[20:23]
    pieces = []
    cut = generate_text(
        model, tok, "ROMEO:", 60, temperature=0, stop=[stop], on_text=lambda _, p: pieces.append(p)
    )
    assert cut == full[: full.index(stop)] and len(cut) <= 20
    assert "".join(pieces) == cut


def test_streaming_concatenates_to_the_returned_texts(char_model):
    model, tok = char_model
    prompts = ["ROMEO:", "To be, or not", "A"]
    pieces = {i: [] for i in range(3)}
    texts = generate_text(
        model, tok, prompts, 40, temperature=1.0, seed=3, on_text=lambda row, p: pieces[row].append(p)
    )
    assert ["".join(pieces[i]) for i in range(3)] == texts
    assert all(len(t) == 40 for t in texts)  # characters: one per token, no stop


def test_batched_text_equals_one_at_a_time(char_model):
    model, tok = char_model
    prompts = ["ROMEO:", "To be, or not to be, that is the question:", "A"]
    batched = generate_text(model, tok, prompts, 30, temperature=0)
    assert batched == [generate_text(model, tok, p, 30, temperature=0) for p in prompts]
    assert len(set(batched)) == 3


def test_same_seed_same_text_different_seed_different_text(char_model):
    model, tok = char_model
    run = lambda seed: generate_text(model, tok, "ROMEO:", 40, temperature=1.0, top_k=20, seed=seed)
    assert run(1) == run(1)
    assert run(1) != run(2)


def test_beam_search_through_the_text_api(char_model):
    model, tok = char_model
    beams = generate_text(model, tok, ["ROMEO:", "A"], 20, num_beams=3)
    assert beams == [generate_text(model, tok, p, 20, num_beams=3) for p in ["ROMEO:", "A"]]


def test_generator_or_seed_makes_library_calls_independent(char_model):
    model, tok = char_model
    g = torch.Generator().manual_seed(5)
    a = generate_text(model, tok, "A", 20, temperature=1.0, generator=g)
    b = generate_text(model, tok, "A", 20, temperature=1.0, generator=g)
    assert a != b  # the generator moved on
    assert a == generate_text(model, tok, "A", 20, temperature=1.0, seed=5)


def test_keyword_settings_go_through_the_sampling_config(char_model):
    model, tok = char_model
    with pytest.raises(ConfigError, match="temperature=-1 must be >= 0"):
        generate_text(model, tok, "A", 5, temperature=-1)
    with pytest.raises(TypeError, match="unknown sampling setting\\(s\\) temprature"):
        generate_text(model, tok, "A", 5, temprature=0.5)
    # One default: keywords omitted are SamplingConfig's, and keywords replace a config's fields.
    same = lambda **kw: generate_text(model, tok, "A", 20, seed=3, **kw)
    assert same() == same(sampling=SamplingConfig())
    assert same(temperature=1.0) == same(sampling=SamplingConfig(temperature=1.0))
    assert same(sampling=SamplingConfig(top_k=5), temperature=0) == same(temperature=0, top_k=5)
