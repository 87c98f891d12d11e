"""The evaluation tasks behind one API, which evaluate.py (gpt.evaluate.command) and the training
callback (gpt.train.callbacks.Evaluate) both call: read what a task scores, score a model on it, turn
the scores into metrics. The callers decide only where the data comes from, when to run and where
the results go.

- generate: prompt -> completion pairs completed with each decoding method; exact match, token
  accuracy, chrF, BLEU per method (gpt.evaluate.decode).
- hellaswag, mc: multiple choice by log-likelihood; acc, acc_norm (gpt.evaluate.choice).
- bpb: bits per byte, loss and perplexity over a corpus's validation windows (gpt.evaluate.bpb).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

from gpt.config import FROM_CHECKPOINT, DataConfig, DecodeConfig
from gpt.data.pairs import Example, read_examples
from gpt.data.sources import find_files
from gpt.errors import UserError
from gpt.evaluate.bpb import bpb_metrics, score_bpb
from gpt.evaluate.choice import (
    ChoiceExample,
    choice_metrics,
    choice_sums,
    encode_choices,
    read_choices,
    read_hellaswag,
    score_choices,
)
from gpt.evaluate.decode import evaluate
from gpt.model.transformer import GPT
from gpt.templates import Template, get_template, template_of
from gpt.tokenizer import Tokenizer

CHOICE_TASKS = ("hellaswag", "mc")


@dataclass
class Scored:
    """A model's scores on a task's items. `sums`: for hellaswag, mc and bpb counts and totals, which
    add up over shares of the items (so ranks can sum theirs before `task_metrics`); for generate the
    metrics themselves, {method/metric: value} (chrF and BLEU are corpus scores, which do not add
    up). `records`: each example's outcome (generate, hellaswag, mc)."""

    sums: dict[str, float]
    records: list[dict[str, Any]] | None = None


def additive(task: str) -> bool:
    """Whether the task's sums add up over shares of its items (every task but generate)."""
    return task != "generate"


# ----------------------------------------------------------------------------- reading


def prompt_template(spec: str, fmt: Mapping[str, Any] | None) -> tuple[Template, str]:
    """(template, how to name it): `spec` as given, or for `checkpoint` the recorded data_format `fmt`
    (plain when there is none)."""
    if spec != FROM_CHECKPOINT:
        return get_template(spec), spec
    if fmt is not None:
        return template_of(dict(fmt)), f"{fmt.get('template', 'custom')} (the checkpoint's)"
    return get_template("plain"), "plain (the checkpoint saved none)"


def pair_files(data: DataConfig) -> list[Path]:
    """generate: the .jsonl files of data.path (a file or a folder), which must exist."""
    path = Path(data.path)
    if not path.exists():
        raise UserError(
            f"data.path {str(path)!r} does not exist; pass a .jsonl file of prompt -> completion pairs "
            "(or a folder of them)"
        )
    return find_files(data)


def read_pairs(data: DataConfig, files: list[Path], template: Template, limit: int | None) -> list[Example]:
    """generate: the first `limit` pairs of `files`, written with `template` (data.fields renames)."""
    return list(islice(read_examples(data, files, template), limit))


def read_choice_examples(
    task: str,
    file: Path,
    fields: Mapping[str, str] | None,
    limit: int | None,
    tokenizer: Tokenizer | None = None,
    block_size: int | None = None,
) -> list[ChoiceExample]:
    """hellaswag, mc: the first `limit` rows of `file` (mc: `fields` renames context, choices, label).
    With a tokenizer, each row is encoded once here, so that one the model cannot score stops the
    caller now rather than midway (the callback: before training)."""
    examples = read_hellaswag(file) if task == "hellaswag" else read_choices(file, fields or {})
    examples = examples[:limit]
    if tokenizer is not None:
        for example in examples:
            encode_choices(tokenizer, example, block_size)
    return examples


# ----------------------------------------------------------------------------- scoring


def score(
    task: str,
    model: GPT,
    tokenizer: Tokenizer,
    items: Sequence[Any],
    decoding: DecodeConfig,
    progress: bool = False,
) -> Scored:
    """Score `model` on `items` (generate: EvalExamples; hellaswag, mc: ChoiceExamples; bpb: windows).
    decoding.batch_size is every task's batch; the other settings are generate's. The model is in
    eval mode while it is scored and left in the mode it was in."""
    was_training = model.training
    model.eval()
    try:
        if task == "generate":
            metrics, records = evaluate(model, tokenizer, items, decoding, progress=progress)
            flat = {f"{m}/{name}": value for m, scores in metrics.items() for name, value in scores.items()}
            return Scored(flat, records)
        if task == "bpb":
            return Scored(score_bpb(model, tokenizer, items, decoding.batch_size, progress=progress))
        records = score_choices(model, tokenizer, items, decoding.batch_size, progress=progress)
        return Scored(choice_sums(records), records)
    finally:
        model.train(was_training)


def task_metrics(task: str, sums: Mapping[str, float]) -> dict[str, float]:
    """The metrics of Scored.sums (summed over ranks where the task is additive)."""
    if task == "bpb":
        return bpb_metrics(dict(sums))
    if task in CHOICE_TASKS:
        return choice_metrics(sums)
    return dict(sums)
