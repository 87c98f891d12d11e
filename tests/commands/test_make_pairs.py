"""scripts/make_pairs.py: the worked examples' tasks, written offline and deterministically."""

from __future__ import annotations

import json
from pathlib import Path

from tests.helpers import assert_ok, run_forked


def read(path: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_numbers_are_written_in_words_and_the_test_numbers_are_never_trained_on(tmp_path):
    args = ("scripts/make_pairs.py", "numbers", "--out", "n", "--max", "2099", "--test", "100")
    assert_ok(run_forked(*args, cwd=tmp_path))
    train, test = read(tmp_path / "n/train.jsonl"), read(tmp_path / "n/test.jsonl")
    assert (len(train), len(test)) == (2000, 100)
    assert sorted(int(r["prompt"]) for r in train + test) == list(range(2100))  # each number once
    words = {r["prompt"]: r["completion"] for r in train + test}
    assert words["0"] == "zero" and words["115"] == "one hundred fifteen"
    assert words["2026"] == "two thousand twenty-six" and words["1000"] == "one thousand"
    assert words["90"] == "ninety" and words["1001"] == "one thousand one"
    assert_ok(run_forked(*args[:3], "again", *args[4:], cwd=tmp_path))  # seeded: the same files
    assert (tmp_path / "again/test.jsonl").read_bytes() == (tmp_path / "n/test.jsonl").read_bytes()


def test_dialogue_pairs_each_speech_with_the_next_and_holds_out_the_last_tenth(tmp_path):
    speeches = [f"S{i}:\nLine {i}." for i in range(20)]
    (tmp_path / "play.txt").write_text("\n\n".join(speeches) + "\n", encoding="utf-8")
    assert_ok(
        run_forked("scripts/make_pairs.py", "dialogue", "--text", "play.txt", "--out", "d", cwd=tmp_path)
    )
    train, test = read(tmp_path / "d/train.jsonl"), read(tmp_path / "d/test.jsonl")
    pairs = [{"prompt": a, "completion": b} for a, b in zip(speeches, speeches[1:], strict=False)]
    assert train == pairs[:18] and test == pairs[18:]


def test_a_bad_value_is_one_line_and_writes_nothing(tmp_path):
    proc = run_forked("scripts/make_pairs.py", "numbers", "--out", "n", "--test", "0", cwd=tmp_path)
    assert (
        proc.returncode == 2 and proc.stderr == "make_pairs.py: need 0 < --test (0) < --max (9999) < 10**12\n"
    )
    assert not (tmp_path / "n").exists()


def test_reverse_pairs_distinct_strings_with_their_reversal_and_holds_out_the_test_ones(tmp_path):
    args = (
        "scripts/make_pairs.py",
        "reverse",
        "--out",
        "r",
        "--count",
        "300",
        "--test",
        "20",
        "--length",
        "6",
    )
    assert_ok(run_forked(*args, cwd=tmp_path))
    train, test = read(tmp_path / "r/train.jsonl"), read(tmp_path / "r/test.jsonl")
    assert (len(train), len(test)) == (280, 20)
    prompts = [r["prompt"] for r in train + test]
    assert len(set(prompts)) == 300 and {len(p) for p in prompts} == {4, 5, 6}
    assert all(r["completion"] == r["prompt"][::-1] and r["prompt"].isalpha() for r in train + test)
    proc = run_forked(*args[:2], "--out", "bad", "--length", "3", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr == "make_pairs.py: --length 3 must be in 4..64\n"
    assert not (tmp_path / "bad").exists()
