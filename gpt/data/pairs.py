"""Paired data: JSONL rows of prompt -> completion, in the conventions users already have, joined by
a prompt template into one stream of text segments, each marked as trained on or not.

Row formats (the field names can be mapped with data.fields):
- TRL:          {"prompt": ..., "completion": ...}
- Alpaca/litgpt: {"instruction": ..., "input": ... (optional), "output": ...}
- translation:  {"source": ..., "target": ...}
- chat:         {"messages": [{"role": "system" | "user" | "assistant", "content": ...}, ...]}:
                the loss is on the assistant turns.

Each completion (each assistant turn) is followed by the tokenizer's end-of-text token, trained on,
so that a fine-tuned model says where its answer ends. A template is saved with the checkpoint
(`data_format`), so generation formats a prompt the way the model was trained.

`prepare_pairs(cfg)` reads every row, tokenizes each example, splits train/val by example and caches
the result under cfg.cache_dir, the way `gpt.data.prepare.prepare` caches a text corpus; packing the
examples into batches is gpt/data/pairs_datamodule.py.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gpt.config import PAIR_FIELDS, DataConfig
from gpt.data.encode import token_dtype
from gpt.data.prepare import CachedData, cache_name, fingerprint, write_atomically
from gpt.data.sources import find_files, jsonl_rows
from gpt.errors import UserError
from gpt.templates import Template, get_template
from gpt.tokenizer import CharTokenizer, Tokenizer, get_tokenizer

# ----------------------------------------------------------------------------- the checkpoint's record


def data_format(cfg: DataConfig) -> dict[str, Any]:
    """What a checkpoint keeps of how its prompts were written: the template's strings (not only its
    name, so that a later change to a named template does not change old models), plain data."""
    return {"template": cfg.template, **asdict(get_template(cfg.template))}


# ----------------------------------------------------------------------------- rows -> examples


@dataclass(frozen=True)
class Example:
    """One row as text segments in order, each (text, trained on); `where` is FILE:LINE.

    Adjacent segments with the same flag are merged, so a chat of one user turn and one assistant
    turn is the same example as the prompt/completion row with the same texts.
    """

    segments: tuple[tuple[str, bool], ...]
    where: str

    @property
    def prompt(self) -> str:
        """Everything before the last trained segment: what generation is given."""
        last = max(i for i, (_, trained) in enumerate(self.segments) if trained)
        return "".join(text for text, _ in self.segments[:last])

    @property
    def completion(self) -> str:
        """The last trained segment: the reference an evaluation compares generations with."""
        return next(text for text, trained in reversed(self.segments) if trained)


def merge_segments(segments: list[tuple[str, bool]]) -> tuple[tuple[str, bool], ...]:
    merged: list[tuple[str, bool]] = []
    for text, trained in segments:
        if merged and merged[-1][1] == trained:
            merged[-1] = (merged[-1][0] + text, trained)
        elif text or trained:  # an empty prompt part is dropped; an empty completion still gets its eot
            merged.append((text, trained))
    return tuple(merged)


def field_names(cfg: DataConfig) -> dict[str, str]:
    """The file's name for each of our fields (data.fields maps ours to yours)."""
    return {name: cfg.fields.get(name, name) for name in PAIR_FIELDS}


def row_example(row: Any, names: dict[str, str], template: Template, where: str) -> Example:
    """One JSON row -> its segments; a row of no known format, or with a non-string field, is refused."""

    def text(key: str, optional: bool = False) -> str:
        value = row.get(names[key])
        if value is None and optional:  # absent or null: Alpaca rows without an input
            return ""
        if not isinstance(value, str):
            kind = "null" if value is None else type(value).__name__
            what = "is missing" if names[key] not in row else f"is {kind}, not a string"
            raise UserError(
                f"{where}: field {names[key]!r} {what}; fix the row or map the field with data.fields"
            )
        return value

    if not isinstance(row, dict):
        raise UserError(
            f"{where} is not a JSON object; each line must be one, such as "
            '{"prompt": "...", "completion": "..."}'
        )
    if names["messages"] in row:
        return Example(merge_segments(chat_segments(row[names["messages"]], names, template, where)), where)
    if names["instruction"] in row and names["output"] in row:
        instruction, extra = text("instruction"), text("input", optional=True)
        prompt = instruction + (f"\n\n{extra}" if extra else "")
        fields, completion = {"prompt": prompt, "instruction": instruction, "input": extra}, text("output")
    elif names["prompt"] in row and names["completion"] in row:
        prompt, completion = text("prompt"), text("completion")
        fields = {"prompt": prompt, "instruction": prompt, "input": ""}
    elif names["source"] in row and names["target"] in row:
        prompt, completion = text("source"), text("target")
        fields = {"prompt": prompt, "instruction": prompt, "input": ""}
    else:
        raise UserError(
            f"{where} has none of the paired formats' fields (prompt/completion, instruction/output, "
            f"source/target, messages; it has {', '.join(map(repr, row)) or 'none'}); map yours with "
            "data.fields, e.g. 'data.fields={prompt: question, completion: answer}'"
        )
    return Example(merge_segments([(template.render_prompt(fields), False), (completion, True)]), where)


def chat_segments(
    messages: Any, names: dict[str, str], template: Template, where: str, whole: bool = True
) -> list[tuple[str, bool]]:
    """A chat's turns as segments (text, trained on); whole=False takes a conversation still
    waiting for its assistant turn (serving), which training and evaluation refuse."""
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: {names['messages']!r} is not a non-empty list of turns")
    segments = []
    for i, turn in enumerate(messages):
        role = turn.get(names["role"]) if isinstance(turn, dict) else None
        content = turn.get(names["content"]) if isinstance(turn, dict) else None
        if not isinstance(role, str) or not isinstance(content, str):
            raise UserError(
                f"{where}: turn {i} needs string fields {names['role']!r} and {names['content']!r}; "
                "map yours with data.fields (role: ..., content: ...)"
            )
        if role == "assistant":
            segments += [(template.reply, False), (content, True)]
        else:
            segments.append((template.turn.format(role=role, content=content), False))
    if whole and not any(trained for _, trained in segments):
        raise UserError(f"{where} has no assistant turn, so nothing to learn; every chat needs one")
    return segments


def pair_files(cfg: DataConfig, files: list[Path]) -> list[Path]:
    """The .jsonl (.jsonl.gz) files among `files`; anything else is refused, by name."""
    for path in files:
        if not path.name.removesuffix(".gz").endswith(".jsonl"):
            raise UserError(
                f"{path} is not a .jsonl file; paired data is JSON lines (.jsonl or .jsonl.gz), "
                "one example per line"
            )
    return files


def read_examples(cfg: DataConfig, files: list[Path], template: Template | None = None) -> Iterator[Example]:
    """Every row of the files, in order, as an Example; `template` (a checkpoint's, when evaluating
    it) replaces cfg.template."""
    names, template = field_names(cfg), template or get_template(cfg.template)
    for path in pair_files(cfg, files):
        for lineno, row in jsonl_rows(path):
            yield row_example(row, names, template, f"{path}:{lineno}")


# ----------------------------------------------------------------------------- examples -> tokens


def encode_example(example: Example, tokenizer: Tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """(ids, completion) of one example: token ids (int64), and for each token whether it belongs to
    a trained segment (each of which is followed by the end-of-text token, which belongs to it too)."""
    if tokenizer.eot_token is None:
        raise UserError("paired data needs a tokenizer with an end-of-text token; this one has none")
    ids: list[int] = []
    completion: list[bool] = []
    for text, trained in example.segments:
        try:
            piece = tokenizer.encode(text) + ([tokenizer.eot_token] if trained else [])
        except UserError as e:  # a character outside the vocabulary of the model being fine-tuned
            if not isinstance(tokenizer, CharTokenizer):
                raise UserError(f"{example.where}: {e}") from None
            c = next(c for c in text if c not in tokenizer.stoi)
            # The tokenizer's own message says to change the prompt; here it is a row of the data.
            raise UserError(
                f"{example.where} holds {c!r} (U+{ord(c):04X}), a character not in the "
                f"{len(tokenizer.chars)}-character vocabulary of the model being fine-tuned; remove or "
                "replace it in that row"
            ) from None
        ids += piece
        completion += [trained] * len(piece)
    return np.asarray(ids, dtype=np.int64), np.asarray(completion, dtype=bool)


# ----------------------------------------------------------------------------- the cached prepare step

# Bumped whenever what prepare_pairs writes changes, so that older cache folders are not read.
PAIRS_FORMAT = 1
SPLITS = ("train", "val")
ARRAYS = ("ids", "completion", "offsets", "index")


@dataclass(frozen=True)
class TokenizedExamples:
    """One split's examples, stored flat: example i is ids[offsets[i]:offsets[i + 1]] with each token's
    completion flag (encode_example's), and index[i] its position among all the rows read."""

    ids: np.ndarray
    completion: np.ndarray
    offsets: np.ndarray
    index: np.ndarray

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        lo, hi = self.offsets[i], self.offsets[i + 1]
        return self.ids[lo:hi], self.completion[lo:hi]

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def source_lengths(self) -> np.ndarray:
        """Each example's tokens before its last trained segment (the final run of completion
        tokens, with its end-of-text): the source an encoder-decoder's encoder reads. The rest is
        its target; the earlier turns of a chat are source."""
        if not len(self):
            return np.zeros(0, dtype=np.int64)
        slot = np.arange(len(self.ids), dtype=np.int64)
        last_prompt = np.maximum.reduceat(np.where(self.completion, -1, slot), self.offsets[:-1])
        return np.maximum(last_prompt + 1 - self.offsets[:-1], 0)

    def seq2seq_sizes(self, block_size: int) -> tuple[np.ndarray, np.ndarray]:
        """For an encoder-decoder: (the positions each example fills on both sides of a row, the
        targets it has), each side cut to block_size tokens. An empty source is read as one token."""
        source = np.minimum(np.maximum(self.source_lengths, 1), block_size)
        targets = np.minimum(self.lengths - self.source_lengths, block_size)
        return np.maximum(source, targets), targets

    def targets(self, block_size: int, mask_prompt: bool) -> np.ndarray:
        """How many targets with a loss each example has once cut to block_size + 1 tokens: every
        token after its first, or with mask_prompt only those of a completion."""
        kept = np.minimum(self.lengths, block_size + 1)
        if not mask_prompt:
            return kept - 1
        trained = np.concatenate([[0], np.cumsum(self.completion, dtype=np.int64)])
        return trained[self.offsets[:-1] + kept] - trained[self.offsets[:-1] + 1]


@dataclass(frozen=True)
class PreparedPairs(CachedData):
    """Tokenized examples on disk: `{split}-{ids,completion,offsets,index}.npy` and meta.json in `dir`."""

    @property
    def data_format(self) -> dict[str, Any]:
        """What a checkpoint keeps of the prompt template (see data_format())."""
        return self.meta["data_format"]

    def examples(self, split: str) -> TokenizedExamples:
        return TokenizedExamples(
            **{name: np.load(self.dir / f"{split}-{name}.npy", mmap_mode="r") for name in ARRAYS}
        )

    def n_examples(self, split: str) -> int:
        return self.meta[f"{split}_examples"]

    def n_tokens(self, split: str) -> int:
        return self.meta[f"{split}_tokens"]

    def n_truncated(self, block_size: int, split: str = "train", seq2seq: bool = False) -> int:
        """Examples longer than a row holds (block_size + 1 tokens; an encoder-decoder's: block_size
        each side), which are cut to fit it."""
        examples = self.examples(split)
        if seq2seq:
            source = examples.source_lengths
            return int(((source > block_size) | (examples.lengths - source > block_size)).sum())
        return int((examples.lengths > block_size + 1).sum())

    def check_fits(self, block_size: int) -> None:
        """Each split needs an example with a completion token among its first block_size + 1 tokens
        (longer examples are cut): otherwise there is nothing to train on or to validate."""
        if block_size < 2:
            raise UserError(f"model.block_size={block_size} is too small for paired data; use at least 2")
        for split in SPLITS:
            if not self.examples(split).targets(block_size, mask_prompt=True).any():
                raise UserError(
                    f"no example of the {split} split has a completion token among its first "
                    f"block_size+1 = {block_size + 1} tokens, so there is nothing to learn; use a larger "
                    "model.block_size or shorter prompts"
                )


def pairs_fingerprint(cfg: DataConfig, files: list[Path], tok_key: dict[str, Any]) -> str:
    """prepare's fingerprint (the files' path, size and mtime, the tokenizer, the split settings) and
    what else changes the tokens: the template's strings, the field names, the format version."""
    key = {
        "text": fingerprint(cfg, files, tok_key),
        "pairs": PAIRS_FORMAT,
        "template": data_format(cfg),
        "fields": field_names(cfg),
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def split_by_example(n: int, cfg: DataConfig) -> np.ndarray:
    """Which of n examples are held out: round(n * val_fraction) of them, at least one and at most
    n - 1, drawn with split_seed."""
    if n < 2:
        raise UserError(
            f"data.path {cfg.path} holds {n} example{'' if n == 1 else 's'}; paired data needs at least "
            "2, one to train on and one to validate with"
        )
    n_val = min(max(1, round(n * cfg.val_fraction)), n - 1)
    is_val = np.zeros(n, dtype=bool)
    is_val[np.random.default_rng(cfg.split_seed).choice(n, n_val, replace=False)] = True
    return is_val


def prepare_pairs(cfg: DataConfig, tokenizer: Tokenizer | None = None, verbose: bool = True) -> PreparedPairs:
    """Read, tokenize and split cfg's paired data into cfg.cache_dir, or return the cached result.

    `tokenizer` (a checkpoint's, when fine-tuning it) replaces cfg.tokenizer; a character tokenizer
    without an end-of-text token gets one. A bad row stops everything with one line naming its file
    and line, before anything is written.
    """
    files = find_files(cfg)
    if isinstance(tokenizer, CharTokenizer):
        tokenizer = tokenizer.with_eot()
    if tokenizer is None and cfg.tokenizer != "char":
        tokenizer = get_tokenizer(cfg.tokenizer)
    # No tokenizer yet: a character vocabulary, built below from the rows (which the fingerprint covers).
    tok_key = (
        (tokenizer.to_dict() | {"n_vocab": tokenizer.vocab_size})
        if tokenizer is not None
        else {"kind": "char"}
    )
    tok_name = getattr(tokenizer, "name", "char")
    name = f"{cache_name(cfg, files, tok_name)}-pairs-{pairs_fingerprint(cfg, files, tok_key)}"
    out = Path(cfg.cache_dir) / name
    if (out / "meta.json").is_file():
        return PreparedPairs(out, json.loads((out / "meta.json").read_text()))

    t0 = time.perf_counter()
    examples = list(read_examples(cfg, files))
    is_val = split_by_example(len(examples), cfg)
    if tokenizer is None:
        chars = set().union(*(text for example in examples for text, _ in example.segments))
        tokenizer = CharTokenizer.from_text("".join(chars), eot=True)
    encoded = [encode_example(example, tokenizer) for example in examples]
    meta = {
        "format": PAIRS_FORMAT,
        "sources": len(files),
        "first_source": str(files[0]),
        "tokenizer": tokenizer.to_dict(),
        "vocab_size": tokenizer.vocab_size,
        "dtype": token_dtype(tokenizer.vocab_size),
        "data_format": data_format(cfg),
        "examples": len(examples),
        "data": asdict(cfg),
    }
    write_atomically(out, lambda folder: write_examples(folder, encoded, is_val, meta))
    meta = json.loads((out / "meta.json").read_text())
    if verbose:
        print(
            f"prepared {meta['examples']:,} examples ({meta['train_examples']:,} train, "
            f"{meta['val_examples']:,} val; {meta['train_tokens'] + meta['val_tokens']:,} tokens, "
            f"{meta['vocab_size']:,}-token vocabulary) in {time.perf_counter() - t0:.1f}s into {out}"
        )
    return PreparedPairs(out, meta, fresh=True)


def write_examples(
    folder: Path, encoded: list[tuple[np.ndarray, np.ndarray]], is_val: np.ndarray, meta: dict[str, Any]
) -> dict[str, Any]:
    """Each split's arrays into `folder`; returns `meta` with the split's counts added."""
    meta = dict(meta)
    for split, members in (("train", np.flatnonzero(~is_val)), ("val", np.flatnonzero(is_val))):
        lengths = np.array([len(encoded[i][0]) for i in members], dtype=np.int64)
        arrays = {
            "ids": np.concatenate([encoded[i][0] for i in members]).astype(meta["dtype"]),
            "completion": np.concatenate([encoded[i][1] for i in members]),
            "offsets": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
            "index": members.astype(np.int64),
        }
        for name, array in arrays.items():
            np.save(folder / f"{split}-{name}.npy", array)
        meta |= {f"{split}_examples": len(members), f"{split}_tokens": int(lengths.sum())}
    return meta
