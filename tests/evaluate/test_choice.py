"""Multiple-choice examples and scores: HellaSwag's preprocessing on hand-written rows (exact
strings), acc and acc_norm on hand-made log-likelihoods, the JSONL reader and its one-line errors,
finding HellaSwag's validation set (checked, downloaded, or a message that says where to put it)."""

from __future__ import annotations

import hashlib
import json
import re
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from gpt.errors import UserError
from gpt.evaluate import choice
from gpt.evaluate.choice import (
    HELLASWAG_FILE,
    ChoiceExample,
    choice_metrics,
    choice_record,
    choice_sums,
    hellaswag_example,
    hellaswag_file,
    hellaswag_text,
    read_choices,
    read_hellaswag,
    score_choices,
)
from gpt.evaluate.likelihood import encode_pair, loglikelihoods
from gpt.tokenizer import CharTokenizer
from tests.helpers import tiny_model

FIXTURES = Path(__file__).parent / "fixtures"

# ----------------------------------------------------------------------------- HellaSwag's rows


@pytest.mark.parametrize(
    "raw, clean",
    [
        ("  plain text.  ", "plain text."),
        # A title's marker becomes a full stop; a marker is removed, not its space.
        ("[header] How to tie a tie [title] Drape it.", " How to tie a tie. Drape it."),
        ("Rinse it. [step] Dry it. [substeps] Gently.", "Rinse it. Dry it. Gently."),
        # The harness strips before it removes markers: a leading one leaves its space.
        ("[title] Cross the ends.", " Cross the ends."),
        ("Boil it.  Cool it.", "Boil it. Cool it."),
        # Three spaces become two: one replacement pass, as the harness does.
        ("a   b", "a  b"),
    ],
)
def test_hellaswag_text(raw, clean):
    assert hellaswag_text(raw) == clean


def row(**kw) -> dict:
    base = {
        "activity_label": "Long jump",
        "ctx_a": "An athlete runs down a track.",
        "ctx_b": "he",
        "endings": ["jumps.", "sits.", "naps.", "sings."],
        "label": 0,
    }
    return base | kw


@pytest.mark.parametrize(
    "ctx_b, context",
    [
        ("he", "Long jump: An athlete runs down a track. He"),
        ("SHE Then", "Long jump: An athlete runs down a track. She then"),  # str.capitalize lowers the rest
        ("", "Long jump: An athlete runs down a track."),  # the joining space is stripped
        ("[step] then he", "Long jump: An athlete runs down a track. then he"),
    ],
)
def test_hellaswag_query(ctx_b, context):
    assert hellaswag_example(row(ctx_b=ctx_b), "f:1").context == context


def test_hellaswag_labels_as_int_or_digit_string():
    assert hellaswag_example(row(label=2), "f:1").label == 2
    assert hellaswag_example(row(label="3"), "f:1").label == 3


def test_read_hellaswag_fixture():
    path = FIXTURES / "hellaswag_mini.jsonl"
    examples = read_hellaswag(path)
    assert len(examples) == 12
    assert examples[1] == ChoiceExample(
        "Playing guitar: A young man sits on a stool holding an acoustic guitar. The man",
        (
            "strums the strings while tapping his foot.",
            "eats the guitar slowly.",
            "puts the guitar in the oven.",
            "walks away and the stool begins to sing.",
        ),
        0,
        f"{path}:2",
    )
    tea = examples[7]
    assert tea.context == (
        "Food and Entertaining: How to make iced tea. Boil the water. Bring four cups of water to a boil "
        "in a pot. Take the pot off the heat. Add the tea bags and"
    )
    assert tea.choices[0] == "let them steep for five minutes. Remove the bags and let the tea cool."
    assert tea.choices[2] == " Serve the tea bags on a plate. Garnish them with lemon."
    assert [ex.label for ex in examples] == [0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 3, 1]


@pytest.mark.parametrize(
    "bad, message",
    [
        ([1, 2], "not a JSON object"),
        (row(ctx_a=None), "field 'ctx_a' is missing or not a string"),
        (row(endings="jumps."), "field 'endings' must be a list of at least 2 non-empty strings"),
        (row(endings=["a", 3]), "field 'endings' must be a list"),
        (row(label="x"), "field 'label' is 'x', not an index of its 4 choices"),
        (row(label=4), "field 'label' is 4, not an index"),
    ],
)
def test_bad_hellaswag_rows_name_file_and_line(tmp_path, bad, message):
    path = tmp_path / "val.jsonl"
    path.write_text(json.dumps(row()) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(UserError, match=re.escape(f"{path}:2: ") + ".*" + re.escape(message)) as e:
        read_hellaswag(path)
    assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------- acc and acc_norm


def test_acc_and_acc_norm_can_disagree():
    # Most likely: choice 0. Per character: choice 1 (-12 / 8 = -1.5 beats -4 / 1 = -4).
    example = ChoiceExample("Q", ("a", "abcdefgh", "abc"), label=1)
    record = choice_record(example, [-4.0, -12.0, -9.0])
    assert record["lengths"] == [1, 8, 3]
    assert (record["pred"], record["pred_norm"]) == (0, 1)
    assert (record["acc"], record["acc_norm"]) == (0, 1)


def test_an_ending_of_markers_only_is_kept_empty_and_never_wins_acc_norm(tmp_path):
    path = tmp_path / "val.jsonl"
    path.write_text(json.dumps(row(endings=["[step]", "b", "c", "d"], label=0)) + "\n")
    (example,) = read_hellaswag(path)
    assert example.choices == ("", "b", "c", "d")
    # Per character the empty choice is -inf (the harness's numpy division), even when it is the most likely.
    record = choice_record(example, [-0.5, -3.0, -2.0, -4.0])
    assert (record["pred"], record["pred_norm"], record["acc"], record["acc_norm"]) == (0, 2, 1, 0)


def test_a_tie_picks_the_first_choice():
    example = ChoiceExample("Q", ("ab", "cd", "ef"), label=1)
    record = choice_record(example, [-5.0, -3.0, -3.0])
    assert (record["pred"], record["pred_norm"], record["acc"], record["acc_norm"]) == (1, 1, 1, 1)
    record = choice_record(ChoiceExample("Q", ("ab", "cd"), label=1), [-2.0, -2.0])
    assert (record["pred"], record["acc"]) == (0, 0)


def test_sums_and_percentages():
    records = [
        {"acc": 1, "acc_norm": 0},
        {"acc": 0, "acc_norm": 0},
        {"acc": 1, "acc_norm": 1},
        {"acc": 0, "acc_norm": 1},
    ]
    sums = choice_sums(records)
    assert sums == {"examples": 4.0, "acc": 2.0, "acc_norm": 2.0}
    assert choice_metrics({"examples": 8.0, "acc": 2.0, "acc_norm": 6.0}) == {"acc": 25.0, "acc_norm": 75.0}


def test_score_choices_scores_each_choice_after_a_space():
    tok = CharTokenizer(" abcQ?", eot=True)  # ids: ' ' 0, a 1, b 2, c 3, Q 4, ? 5
    model = tiny_model(vocab_size=tok.vocab_size)
    examples = [ChoiceExample("Q?", ("a", "bb", "c"), 2), ChoiceExample("Q ", ("ab", "ca"), 0)]
    records = score_choices(model, tok, examples, batch_size=2)
    pairs = [encode_pair(tok, ex.context, " " + c) for ex in examples for c in ex.choices]
    lls = [ll for ll, _ in loglikelihoods(model, pairs, batch_size=1)]
    assert records[0]["loglikelihoods"] == pytest.approx(lls[:3], abs=1e-6)
    assert records[1]["loglikelihoods"] == pytest.approx(lls[3:], abs=1e-6)
    assert pairs[3] == ([4], [0, 0, 1, 2])  # "Q " + " ab": both spaces go with the choice


def test_a_character_outside_the_vocabulary_names_the_example():
    tok = CharTokenizer(" abQ", eot=True)
    examples = [ChoiceExample("Q", ("a", "z"), 0, "mc.jsonl:7")]
    with pytest.raises(UserError, match=r"^mc.jsonl:7: character 'z'"):
        score_choices(tiny_model(vocab_size=tok.vocab_size), tok, examples, batch_size=2)


# ----------------------------------------------------------------------------- any multiple-choice JSONL


def test_read_choices_fixture():
    path = FIXTURES / "mc_mini.jsonl"
    examples = read_choices(path)
    assert len(examples) == 10
    assert [len(ex.choices) for ex in examples] == [2, 3, 5, 2, 3, 3, 5, 2, 3, 4]
    assert examples[3] == ChoiceExample("The opposite of hot is ", ("cold", "warm"), 0, f"{path}:4")


def test_read_choices_maps_fields(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text(json.dumps({"question": "2+2=", "choices": ["3", "4"], "answer": 1, "id": 9}) + "\n\n")
    examples = read_choices(path, {"context": "question", "label": "answer"})
    assert examples == [ChoiceExample("2+2=", ("3", "4"), 1, f"{path}:1")]


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "is not JSON"),
        ('["a"]', "not a JSON object"),
        ('{"question": "Q", "choices": ["a", "b"]}', "field 'answer' is missing"),
        ('{"question": "Q", "answer": 0}', "field 'choices' is missing"),
        ('{"question": 3, "choices": ["a", "b"], "answer": 0}', "field 'question' is int, not a string"),
        ('{"question": "Q", "choices": "ab", "answer": 0}', "field 'choices' must be a list of at least 2"),
        ('{"question": "Q", "choices": ["a"], "answer": 0}', "field 'choices' must be a list of at least 2"),
        ('{"question": "Q", "choices": ["a", ""], "answer": 0}', "non-empty strings"),
        ('{"question": "Q", "choices": ["a", "b"], "answer": "1"}', "field 'answer' is '1', not an index"),
        (
            '{"question": "Q", "choices": ["a", "b"], "answer": 2}',
            "field 'answer' is 2, not an index of its 2",
        ),
        ('{"question": "Q", "choices": ["a", "b"], "answer": -1}', "field 'answer' is -1"),
        ('{"question": "Q", "choices": ["a", "b"], "answer": true}', "field 'answer' is True"),
    ],
)
def test_bad_rows_name_file_and_line(tmp_path, line, message):
    path = tmp_path / "qa.jsonl"
    path.write_text('{"question": "Q", "choices": ["a", "b"], "answer": 0}\n' + line + "\n")
    with pytest.raises(UserError, match=re.escape(f"{path}:2") + ".*" + re.escape(message)) as e:
        read_choices(path, {"context": "question", "label": "answer"})
    assert "\n" not in str(e.value)


def test_an_empty_file_is_refused(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    with pytest.raises(UserError, match="holds no examples"):
        read_choices(path)


# ----------------------------------------------------------------------------- finding HellaSwag


def test_hellaswag_file_present_and_checked(tmp_path, monkeypatch):
    path = tmp_path / HELLASWAG_FILE
    path.write_bytes(b'{"a": 1}\n')
    monkeypatch.setattr(choice, "HELLASWAG_SHA256", hashlib.sha256(b'{"a": 1}\n').hexdigest())
    assert hellaswag_file(tmp_path) == path


def test_a_corrupt_hellaswag_file_is_refused(tmp_path):
    (tmp_path / HELLASWAG_FILE).write_text("not HellaSwag\n")
    with pytest.raises(UserError, match="its sha256 does not match.*delete it to download it again") as e:
        hellaswag_file(tmp_path)
    assert "\n" not in str(e.value)


def test_no_network_says_where_to_put_it(tmp_path, monkeypatch, capsys):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    root = tmp_path / "data"
    with pytest.raises(
        UserError, match=rf"not in {re.escape(str(root))}/ .*put {HELLASWAG_FILE} .*GPT_DATA_DIR"
    ):
        hellaswag_file(root)
    assert "downloading" in capsys.readouterr().err
    assert list(root.iterdir()) == []  # no partial download left behind
