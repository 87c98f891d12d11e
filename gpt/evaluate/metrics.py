"""Scores of generated completions against their references, each a percentage (0 to 100):

- exact_match: the share of examples whose completion equals the reference, both stripped of
  leading and trailing whitespace;
- token_accuracy: the share of reference tokens that the generated tokens match at the same
  position, summed over all examples (a generation shorter than its reference misses the rest;
  tokens past the reference's end are not counted: exact match sees those). The tokens are the
  model's own: the ids it generated up to end-of-text, and the reference as the tokenizer encodes
  it (as in training);
- chrf, bleu: sacrebleu's corpus chrF and BLEU with its default settings (BLEU's 13a tokenizer).
  BLEU counts up to 4-grams over the whole corpus, so outputs of a few words score near 0 with
  it: for short answers read exact match and chrF.
"""

from __future__ import annotations

from collections.abc import Sequence

import sacrebleu

METRICS = ("exact_match", "token_accuracy", "chrf", "bleu")


def exact_match(outputs: Sequence[str], references: Sequence[str]) -> float:
    if not outputs:
        return 0.0
    hits = sum(o.strip() == r.strip() for o, r in zip(outputs, references, strict=True))
    return 100.0 * hits / len(outputs)


def matches(output: str, reference: str) -> bool:
    """One example's exact match."""
    return output.strip() == reference.strip()


def token_accuracy(outputs: Sequence[Sequence[int]], references: Sequence[Sequence[int]]) -> float:
    """Reference tokens matched at their position, over all examples' reference tokens (0 when no
    reference has a token)."""
    hit = total = 0
    for out, ref in zip(outputs, references, strict=True):
        # A generation shorter than its reference misses the rest; past the reference's end, nothing counts.
        hit += sum(o == r for o, r in zip(out, ref, strict=False))
        total += len(ref)
    return 100.0 * hit / total if total else 0.0


def chrf(outputs: Sequence[str], references: Sequence[str]) -> float:
    return sacrebleu.corpus_chrf(list(outputs), [list(references)]).score


def bleu(outputs: Sequence[str], references: Sequence[str]) -> float:
    return sacrebleu.corpus_bleu(list(outputs), [list(references)]).score


def score(
    outputs: Sequence[str],
    references: Sequence[str],
    output_ids: Sequence[Sequence[int]],
    reference_ids: Sequence[Sequence[int]],
) -> dict[str, float]:
    """Every metric of one method's outputs, by name (METRICS order)."""
    return {
        "exact_match": exact_match(outputs, references),
        "token_accuracy": token_accuracy(output_ids, reference_ids),
        "chrf": chrf(outputs, references),
        "bleu": bleu(outputs, references),
    }
