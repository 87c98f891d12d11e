"""The scores on hand-made outputs: exact values, and chrF / BLEU as sacrebleu computes them."""

from __future__ import annotations

import pytest
import sacrebleu

from gpt.evaluate.metrics import METRICS, bleu, chrf, exact_match, matches, score, token_accuracy


def test_exact_match_compares_stripped_texts():
    outputs = ["Paris", " Paris\n", "paris", "Rome"]
    references = ["Paris", "Paris", "Paris", "Paris "]
    assert [matches(o, r) for o, r in zip(outputs, references, strict=True)] == [True, True, False, False]
    assert exact_match(outputs, references) == 50.0
    assert exact_match([], []) == 0.0


def test_token_accuracy_counts_reference_tokens_matched_at_their_position():
    # 2 of 3 (the last differs), 1 of 4 (a short output misses the rest), 2 of 2 (tokens past the
    # reference's end are not counted): 5 of 9 over all examples, not a mean of the examples' shares.
    outputs = [[1, 2, 3], [1], [5, 6, 7, 8]]
    references = [[1, 2, 4], [1, 9, 9, 9], [5, 6]]
    assert token_accuracy(outputs, references) == pytest.approx(100 * 5 / 9)
    assert token_accuracy([[1, 2]], [[2, 1]]) == 0.0  # the same tokens, shifted: no match
    assert token_accuracy([[], [1]], [[], []]) == 0.0  # no reference token at all


def test_chrf_and_bleu_are_sacrebleus_corpus_scores():
    outputs = ["the cat sat on the mat", "a dog barked at the moon", "hello"]
    references = ["the cat sat on a mat", "the dog barked at the moon", "hello world"]
    assert chrf(outputs, references) == sacrebleu.corpus_chrf(outputs, [references]).score
    assert bleu(outputs, references) == sacrebleu.corpus_bleu(outputs, [references]).score
    assert 0 < bleu(outputs, references) < 100 and 0 < chrf(outputs, references) < 100
    assert bleu(references, references) == pytest.approx(100.0)
    assert chrf(references, references) == pytest.approx(100.0)


def test_score_has_every_metric_in_order():
    scores = score(["ab", "cd"], ["ab", "ce"], [[1, 2], [3, 4]], [[1, 2], [3, 5]])
    assert list(scores) == list(METRICS)
    assert scores["exact_match"] == 50.0 and scores["token_accuracy"] == 75.0
    assert scores["chrf"] == sacrebleu.corpus_chrf(["ab", "cd"], [["ab", "ce"]]).score
