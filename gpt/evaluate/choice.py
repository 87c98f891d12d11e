"""Multiple-choice evaluation, as lm-evaluation-harness scores its multiple_choice tasks: each
choice, after a space, is scored as a continuation of the context (gpt.evaluate.likelihood); acc
counts the examples whose most likely choice is the right one, acc_norm those whose most likely
choice per character is (so that long choices are not penalized for their length).

The examples come from HellaSwag's validation set (downloaded once into the data root, checked by
its sha256) or from any multiple-choice JSONL file of {context, choices, label} rows.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpt.config import CHOICE_FIELDS
from gpt.data.sources import find_or_download, jsonl_rows
from gpt.errors import UserError
from gpt.evaluate.likelihood import encode_pair, loglikelihoods
from gpt.model.transformer import GPT
from gpt.tokenizer import Tokenizer

# The harness's target_delimiter: what joins the context and a choice.
TARGET_DELIMITER = " "

HELLASWAG_FILE = "hellaswag_val.jsonl"
HELLASWAG_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
# From the download_checksums of Hugging Face datasets' datasets/hellaswag/dataset_infos.json, which
# lists this file (12,246,618 bytes, 10,042 examples) under github.com/rowanz/hellaswag/raw/master/data/.
# Not verified over the network here.
HELLASWAG_SHA256 = "0aa3b88843990f3f10a97b9575c94d7b71fb2205240ba04ae4884d9e9c992588"


@dataclass(frozen=True)
class ChoiceExample:
    """context: what each choice continues; choices: the candidate continuations (without the space
    that joins them to the context); label: the index of the right one; where: FILE:LINE."""

    context: str
    choices: tuple[str, ...]
    label: int
    where: str = ""


# ----------------------------------------------------------------------------- reading examples


def bad_row(where: str, problem: str) -> UserError:
    return UserError(f"{where}: {problem}; fix or drop the row")


def check_choices(choices: Any, label: Any, where: str, names: Mapping[str, str]) -> None:
    """choices: a list of at least two non-empty strings; label: an int index into it."""
    if not (
        isinstance(choices, list) and len(choices) >= 2 and all(isinstance(c, str) and c for c in choices)
    ):
        raise bad_row(where, f"field {names['choices']!r} must be a list of at least 2 non-empty strings")
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(choices):
        raise bad_row(
            where, f"field {names['label']!r} is {label!r}, not an index of its {len(choices)} choices"
        )


def read_choices(path: Path, fields: Mapping[str, str] | None = None) -> list[ChoiceExample]:
    """The rows of a .jsonl (or .jsonl.gz) file, {"context": str, "choices": [str, ...], "label": int};
    `fields` maps these names to the file's own (e.g. {"context": "question", "label": "answer"})."""
    names = {name: (fields or {}).get(name, name) for name in CHOICE_FIELDS}
    examples = []
    for lineno, row in jsonl_rows(path):
        where = f"{path}:{lineno}"
        if not isinstance(row, dict):
            raise bad_row(where, 'not a JSON object such as {"context": ..., "choices": [...], "label": 0}')
        missing = [n for n in names.values() if n not in row]
        if missing:
            raise bad_row(where, f"field {missing[0]!r} is missing (map yours with data.fields)")
        context, choices, label = (row[names[n]] for n in CHOICE_FIELDS)
        if not isinstance(context, str):
            raise bad_row(where, f"field {names['context']!r} is {type(context).__name__}, not a string")
        check_choices(choices, label, where, names)
        examples.append(ChoiceExample(context, tuple(choices), label, where))
    if not examples:
        raise UserError(f"{path} holds no examples; each line must be one JSON object")
    return examples


def hellaswag_text(text: str) -> str:
    """HellaSwag's text as the harness cleans it (lm_eval/tasks/hellaswag/utils.py, `preprocess`: the
    definition followed here): the WikiHow part's bracketed markers ([header], [step], ...) are
    removed, " [title]" ending a title becomes a full stop, and double spaces become single."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def hellaswag_example(row: Any, where: str) -> ChoiceExample:
    """One row of hellaswag_val.jsonl, as the harness's process_docs builds its query and choices:
    '<activity_label>: <ctx_a> <ctx_b capitalized>', the endings, the label (an int or a digit string)."""
    if not isinstance(row, dict):
        raise bad_row(where, "not a JSON object; HellaSwag rows have ctx_a, ctx_b, endings, label")
    for name in ("activity_label", "ctx_a", "ctx_b"):
        if not isinstance(row.get(name), str):
            raise bad_row(where, f"field {name!r} is missing or not a string")
    label = row.get("label")
    if isinstance(label, str) and label.isdigit():
        label = int(label)
    endings = row.get("endings")
    check_choices(endings, label, where, {"choices": "endings", "label": "label"})
    # An ending that is only markers becomes empty, and is scored as the harness scores it: the
    # delimiter alone, never the choice of acc_norm (see choice_record).
    choices = tuple(hellaswag_text(e) for e in endings)
    context = row["activity_label"] + ": " + row["ctx_a"] + " " + row["ctx_b"].capitalize()
    return ChoiceExample(hellaswag_text(context), choices, label, where)


def read_hellaswag(path: Path) -> list[ChoiceExample]:
    """The examples of a file in the format of HellaSwag's hellaswag_val.jsonl."""
    examples = [hellaswag_example(row, f"{path}:{lineno}") for lineno, row in jsonl_rows(path)]
    if not examples:
        raise UserError(f"{path} holds no examples; it should be HellaSwag's validation set")
    return examples


def hellaswag_file(root: Path) -> Path:
    """<root>/hellaswag_val.jsonl, downloaded there if absent; its sha256 is checked every time."""
    what = "HellaSwag's validation set"
    return find_or_download(root, HELLASWAG_FILE, HELLASWAG_URL, HELLASWAG_SHA256, what, verify=True)


# ----------------------------------------------------------------------------- scoring


def argmax(values: Sequence[float]) -> int:
    """The index of the largest value, the first one on ties (as numpy.argmax)."""
    return max(range(len(values)), key=values.__getitem__)


def choice_record(example: ChoiceExample, lls: Sequence[float]) -> dict[str, Any]:
    """One example's outcome from its choices' log-likelihoods: pred, the most likely choice;
    pred_norm, the most likely per character of the choice (the delimiter not counted)."""
    lengths = [len(c) for c in example.choices]
    pred = argmax(lls)
    # An empty choice (a HellaSwag ending of markers only) per character: -inf, as numpy's division
    # in the harness gives it.
    pred_norm = argmax([ll / n if n else -math.inf for ll, n in zip(lls, lengths, strict=True)])
    return {
        "where": example.where,
        "context": example.context,
        "choices": list(example.choices),
        "label": example.label,
        "loglikelihoods": list(lls),
        "lengths": lengths,
        "pred": pred,
        "pred_norm": pred_norm,
        "acc": int(pred == example.label),
        "acc_norm": int(pred_norm == example.label),
    }


def encode_choices(
    tokenizer: Tokenizer, example: ChoiceExample, block_size: int | None = None
) -> list[tuple[list[int], list[int]]]:
    """Each choice's (context ids, continuation ids). A character the tokenizer lacks, or a choice
    the model cannot score (no tokens of its own, or more than block_size), names the row."""
    where = example.where or "an example"
    try:
        requests = [encode_pair(tokenizer, example.context, TARGET_DELIMITER + c) for c in example.choices]
    except UserError as e:  # a character outside a character model's vocabulary
        what = str(e).split("; ")[0]
        raise UserError(
            f"{where}: {what}; a character model scores only text made of its own characters (leave the "
            "row out, or evaluate a model with a BPE tokenizer)"
        ) from None
    for k, (_, continuation) in enumerate(requests):
        if not continuation:
            raise UserError(f"{where}: choice {k} adds no token of its own to the context; nothing to score")
        if block_size is not None and len(continuation) > block_size:
            raise UserError(
                f"{where}: choice {k} is {len(continuation)} tokens, more than the model's block_size "
                f"{block_size}; a model this short cannot score it (leave the row out, or use a longer model)"
            )
    return requests


def score_choices(
    model: GPT,
    tokenizer: Tokenizer,
    examples: Sequence[ChoiceExample],
    batch_size: int,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """One record per example (choice_record), every choice of every example scored in batches."""
    block_size = model.config.block_size
    requests = [pair for ex in examples for pair in encode_choices(tokenizer, ex, block_size)]
    lls = iter(ll for ll, _ in loglikelihoods(model, requests, batch_size, progress))
    return [choice_record(ex, [next(lls) for _ in ex.choices]) for ex in examples]


def choice_sums(records: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """The number of examples and of correct ones: sums, which ranks can add up before the means."""
    return {
        "examples": float(len(records)),
        "acc": float(sum(r["acc"] for r in records)),
        "acc_norm": float(sum(r["acc_norm"] for r in records)),
    }


def choice_metrics(sums: Mapping[str, float]) -> dict[str, float]:
    """acc and acc_norm as percentages of the examples (of at least one); chance on HellaSwag is 25%."""
    return {name: 100 * sums[name] / sums["examples"] for name in ("acc", "acc_norm")}
