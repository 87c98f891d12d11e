"""data.tokenizer=train: a byte-level BPE (gpt.bpe) trained on the corpus's training split, never its
validation split, and how well it compresses the validation split beside tiktoken's encodings."""

from __future__ import annotations

import codecs
import os
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from gpt.bpe import train_bpe
from gpt.config import ENDOFTEXT, DataConfig
from gpt.data.encode import empty_corpus, iter_parts
from gpt.data.shards import (
    MAX_TOKENS_TO_SPLIT_BY_CHARACTERS,
    MIN_DOCUMENTS_TO_SPLIT_BY_DOCUMENT,
    Draws,
    char_cut,
)
from gpt.tokenizer import BPETokenizer, get_encoding

# The encodings the trained vocabulary is compared with, where tiktoken's cache holds them.
REFERENCE_ENCODINGS = ("r50k_base", "cl100k_base")
# The validation split is decoded and encoded again in pieces of at most this many tokens.
CHUNK_TOKENS = 1 << 20


def training_key(cfg: DataConfig) -> dict[str, Any]:
    """What the trained tokenizer depends on besides the corpus and its split (fingerprint's
    tokenizer key: the same corpus and key give the same ranks)."""
    return {
        "kind": "train",
        "vocab_size": cfg.vocab_size,
        "pattern": cfg.bpe_pattern,
        "special_tokens": [ENDOFTEXT, *cfg.special_tokens],
    }


def first_documents(cfg: DataConfig, files: list[Path]) -> tuple[int, int, int]:
    """(documents, characters, UTF-8 bytes) of the corpus, read only until it has shown
    MIN_DOCUMENTS_TO_SPLIT_BY_DOCUMENT documents: enough to know how the splitter will split it."""
    docs = chars = size = 0
    for part in iter_parts(cfg, files, lambda n: None):
        docs += part.index == 0
        if docs >= MIN_DOCUMENTS_TO_SPLIT_BY_DOCUMENT:
            break
        chars += len(part.text)
        size += len(part.text.encode("utf-8"))
    return docs, chars, size


def train_split_texts(cfg: DataConfig, files: list[Path], progress: Callable[[int], None]) -> Iterator[str]:
    """The corpus's parts (gpt.data.encode.iter_parts) that the prepare step will put in its training
    split, whichever way it splits them (gpt.data.shards.Splitter), drawn as it draws them.

    A corpus of MIN_DOCUMENTS_TO_SPLIT_BY_DOCUMENT documents or more is split by document: the parts
    the draws give to train. One of fewer documents is split by characters unless its parts make
    2^24 tokens or more, which a byte-level BPE cannot make of fewer bytes: under that, the text
    before the cut. Over it, the splitter decides once the corpus is tokenized, so only the text
    that is train either way. Until a part has gone to val, the last one for train is held back:
    if none does, the splitter gives it to val.
    """
    docs, n_chars, n_bytes = first_documents(cfg, files)
    by_document = docs >= MIN_DOCUMENTS_TO_SPLIT_BY_DOCUMENT
    by_characters = not by_document and n_bytes < MAX_TOKENS_TO_SPLIT_BY_CHARACTERS
    cut = None if by_document else char_cut(n_chars, cfg.val_fraction)
    draw = Draws(cfg.val_fraction, cfg.split_seed)
    start, held, val_seen = 0, None, by_characters
    for part in iter_parts(cfg, files, progress):
        split, text = draw(), part.text
        if cut is not None:
            text = text[: max(cut - start, 0)]
            start += len(part.text)
        if split == "val" and not by_characters:
            val_seen = True
            continue
        if not text:
            continue
        if held is not None:
            yield held
            held = None
        if val_seen:
            yield text
        else:
            held = text
    if held is not None and val_seen:
        yield held


class Counted:
    """Passes texts through, counting their UTF-8 bytes and noting whether any holds more than
    whitespace."""

    def __init__(self, texts: Iterable[str]) -> None:
        self.texts, self.bytes, self.has_text = texts, 0, False

    def __iter__(self) -> Iterator[str]:
        for text in self.texts:
            self.bytes += len(text.encode("utf-8"))
            self.has_text = self.has_text or not text.isspace()
            yield text


def train_tokenizer(
    cfg: DataConfig, files: list[Path], progress: Callable[[int], None]
) -> tuple[BPETokenizer, dict[str, Any]]:
    """The BPE data.vocab_size, bpe_pattern and special_tokens describe, trained on the corpus's
    training split (streamed: memory holds the counts of its pieces, not its text); and what the
    training took, for meta.json."""
    t0 = time.perf_counter()
    texts = Counted(train_split_texts(cfg, files, progress))
    tok = train_bpe(texts, cfg.vocab_size, cfg.bpe_pattern, [ENDOFTEXT, *cfg.special_tokens])
    if not texts.has_text:
        raise empty_corpus(cfg, files)
    return tok, {"trained_on_bytes": texts.bytes, "seconds": round(time.perf_counter() - t0, 3)}


# ----------------------------------------------------------------------------- the compression report


def val_texts(tok: BPETokenizer, paths: list[Path], dtype: str) -> Iterator[tuple[str, int]]:
    """The validation split's text and its token count, piece by piece: cut at end-of-text (which
    separates documents and has no text), and every CHUNK_TOKENS tokens within a long document (a
    character whose bytes span two pieces goes whole to the second)."""
    utf8 = codecs.getincrementaldecoder("utf-8")()
    for path in paths:
        ids = np.fromfile(path, dtype=dtype)
        ends = np.flatnonzero(ids == tok.eot_token).tolist()
        start = 0
        for end in [*ends, None]:
            stop = len(ids) if end is None else end
            for a in range(start, stop, CHUNK_TOKENS):
                chunk = ids[a : min(a + CHUNK_TOKENS, stop)].tolist()
                yield utf8.decode(tok.decode_bytes(chunk)), len(chunk)
            if end is not None:
                yield utf8.decode(b"", final=True), 0
                start = end + 1
    yield utf8.decode(b"", final=True), 0


def compression_report(tok: BPETokenizer, paths: list[Path], dtype: str) -> dict[str, Any]:
    """Bytes per token on the validation split (`paths`, its shards): the trained vocabulary's,
    and that of each of REFERENCE_ENCODINGS in tiktoken's cache, on the same text."""
    references = {}
    for name in REFERENCE_ENCODINGS:
        try:
            references[name] = get_encoding(name, download=False)
        except Exception:  # not in the cache (or unreadable): left out of the report
            continue
    threads = len(os.sched_getaffinity(0))
    n_bytes = n_tokens = batch_chars = 0
    counts = dict.fromkeys(references, 0)
    batch: list[str] = []

    def encode(texts: list[str]) -> None:
        for name, enc in references.items():
            counts[name] += sum(map(len, enc.encode_ordinary_batch(texts, num_threads=threads)))

    for text, n in val_texts(tok, paths, dtype):
        n_tokens += n
        if text:
            n_bytes += len(text.encode("utf-8"))
            batch.append(text)
            batch_chars += len(text)
        if batch_chars >= CHUNK_TOKENS:
            encode(batch)
            batch, batch_chars = [], 0
    encode(batch)
    per_token = {tok.name: n_bytes / max(n_tokens, 1)} | {
        name: n_bytes / max(count, 1) for name, count in counts.items()
    }
    return {
        "val_bytes": n_bytes,
        "val_tokens": {tok.name: n_tokens} | counts,
        "bytes_per_token": {name: round(v, 4) for name, v in per_token.items()},
        "missing": [name for name in REFERENCE_ENCODINGS if name not in references],
    }


def report_line(tok: BPETokenizer, report: dict[str, Any]) -> str:
    """The line printed once the tokenizer is trained and the data tokenized (`report`: meta.json's
    tokenizer_training, train_tokenizer's and compression_report's results)."""
    per_token = report["bytes_per_token"]
    ours = per_token[tok.name]
    others = [f"{name} {v:.2f}, {ours / v:.2f}x" for name, v in per_token.items() if name != tok.name]
    missing = [f"{name} not in tiktoken's cache" for name in report["missing"]]
    return (
        f"trained a {tok.vocab_size:,}-token BPE ({tok.pattern} pattern) on "
        f"{report['trained_on_bytes'] / 1e6:,.1f} MB of the training split in {report['seconds']:.1f} s; "
        f"bytes per token of the val split: {ours:.2f} (vs {'; '.join(others + missing)})"
    )
