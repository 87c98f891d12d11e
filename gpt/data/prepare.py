"""Corpus -> token shards + meta.json, streamed, in parallel, cached under a fingerprint: the one
prepare step of prepare.py and the data modules (its steps: docs/design.md, "The prepare step")."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from gpt.config import DEFAULT_EXCLUDE, DEFAULT_INCLUDE, TRAIN_TOKENIZER, DataConfig
from gpt.data.encode import (
    CHAR_SEPARATOR,
    PartCounter,
    char_vocabulary,
    check_characters,
    empty_corpus,
    encode_parts,
    iter_parts,
    make_encoder,
    token_dtype,
)
from gpt.data.shards import ShardWriter, Splitter
from gpt.data.sources import find_files, is_folder, text_files
from gpt.data.train_tokenizer import compression_report, report_line, train_tokenizer, training_key
from gpt.errors import UserError
from gpt.tokenizer import BPETokenizer, CharTokenizer, Tokenizer, get_tokenizer, tokenizer_from_dict

FORMAT_VERSION = 4


# ----------------------------------------------------------------------------- the prepare step


@dataclass(frozen=True)
class CachedData:
    """Tokenized data in a cache folder `dir`, described by its meta.json (`meta`)."""

    dir: Path
    meta: dict[str, Any]
    # True when this call tokenized the data, False when it was found in the cache.
    fresh: bool = False

    def tokenizer(self) -> Tokenizer:
        return tokenizer_from_dict(self.meta["tokenizer"])


@dataclass(frozen=True)
class Prepared(CachedData):
    """A tokenized corpus on disk: `{split}-NNNNN.bin` shards and meta.json in `dir`."""

    def shard_paths(self, split: str) -> list[Path]:
        return [self.dir / s["file"] for s in self.meta["shards"][split]]

    def check_fits(self, block_size: int) -> None:
        """Each split must hold at least one training window (block_size + 1 tokens, and one more)."""
        for split in ("train", "val"):
            n = self.meta[f"{split}_tokens"]
            if n <= block_size + 1:
                raise UserError(
                    f"the {split} split has {n} tokens, fewer than block_size+2 = {block_size + 2}; "
                    "use more text, a smaller model.block_size or a different data.val_fraction"
                )


# The default globs before they took source code (text only, nothing excluded). Where globs choose
# no files (Tiny Shakespeare, a single file, a dataset), today's defaults are hashed as these, so that
# the caches prepared before stay valid.
OLD_DEFAULT_GLOBS = {
    "include": ["*.txt", "*.md", "*.jsonl", "*.txt.gz", "*.md.gz", "*.jsonl.gz"],
    "exclude": [],
}


def hashed_globs(cfg: DataConfig) -> dict[str, list[str]]:
    globs = {"include": list(cfg.include), "exclude": list(cfg.exclude)}
    if is_folder(cfg):
        return globs
    defaults = {"include": list(DEFAULT_INCLUDE), "exclude": list(DEFAULT_EXCLUDE)}
    return {k: OLD_DEFAULT_GLOBS[k] if v == defaults[k] else v for k, v in globs.items()}


def fingerprint(cfg: DataConfig, files: list[Path], tok_key: dict[str, Any]) -> str:
    """Hash of everything the output depends on: sources (path, size, mtime), tokenizer, settings.
    `files` are all the files found, those the prepare step skips as not text included."""
    h = hashlib.sha256()
    settings = {
        k: getattr(cfg, k)
        for k in ("source", "text_field", "hf_config", "hf_split", "val_fraction")
        + ("split_seed", "doc_chars", "shard_tokens")
    } | hashed_globs(cfg)
    h.update(
        json.dumps({"v": FORMAT_VERSION, "tokenizer": tok_key, "settings": settings}, sort_keys=True).encode()
    )
    if cfg.source == "hf" and not Path(cfg.path).expanduser().is_dir():
        h.update(cfg.path.encode())  # a Hub dataset: its name (delete the cache folder to refetch)
    if cfg.source == "hf" and Path(cfg.path).expanduser().is_dir():
        files = sorted(p for p in Path(cfg.path).expanduser().rglob("*") if p.is_file())
    for p in files:
        st = p.stat()
        h.update(f"{p.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def cache_name(cfg: DataConfig, files: list[Path], tok_name: str) -> str:
    if cfg.source == "hf":
        name = Path(cfg.path).name or "hf"
    else:
        name = files[0].name.split(".")[0] if len(files) == 1 else Path(cfg.path).expanduser().resolve().name
    return f"{name}-{tok_name}"


def cache_path(cfg: DataConfig, files: list[Path], tok_name: str, tok_key: dict[str, Any]) -> Path:
    return Path(cfg.cache_dir) / f"{cache_name(cfg, files, tok_name)}-{fingerprint(cfg, files, tok_key)}"


class Meter:
    """The progress bar: bytes read (the bar) and tokens written per second (its postfix)."""

    def __init__(self, total: int | None, desc: str, verbose: bool) -> None:
        # disable=None: drawn only where stderr is a terminal; to a file every redraw would stay in it
        # (the line printed once prepared says what was done).
        disable = None if verbose else True
        self.bar = tqdm(total=total, desc=desc, unit="B", unit_scale=True, disable=disable, leave=verbose)
        self.tokens, self.t0 = 0, time.perf_counter()

    def read(self, n: int) -> None:
        self.bar.update(n)

    def wrote(self, n: int) -> None:
        self.tokens += n
        rate = self.tokens / max(time.perf_counter() - self.t0, 1e-9)
        self.bar.set_postfix_str(f"{self.tokens:,} tokens, {rate / 1e6:.2f}M tok/s", refresh=False)

    def close(self) -> None:
        self.bar.close()


def prepare(cfg: DataConfig, tokenizer: Tokenizer | None = None, verbose: bool = True) -> Prepared:
    """Tokenize the corpus into cfg.cache_dir, or return the cached result.

    `tokenizer` is used instead of cfg.tokenizer: the tokenizer of a model being fine-tuned (a
    character vocabulary then must hold every character of the corpus), or a BPE tokenizer built
    in code (tests use it). data.tokenizer=train trains one on the training split first; the
    settings it is trained with are part of the fingerprint, and the trained tokenizer is saved in
    meta.json with the report of how it compresses the val split.
    """
    files = [] if cfg.source == "hf" else find_files(cfg)
    tok: Tokenizer | None = tokenizer
    if tok is None and cfg.tokenizer not in ("char", TRAIN_TOKENIZER):
        tok = get_tokenizer(cfg.tokenizer)  # a character vocabulary is built below, from the corpus
    if tok is not None:
        tok_key = tok.to_dict() | {"n_vocab": tok.vocab_size}
        tok_name = "char" if isinstance(tok, CharTokenizer) else tok.name
    elif cfg.tokenizer == TRAIN_TOKENIZER:  # trained below, on the corpus
        tok_key, tok_name = training_key(cfg), f"bpe{cfg.vocab_size}"
    else:
        tok_key, tok_name = {"kind": "char"}, "char"
    out = cache_path(cfg, files, tok_name, tok_key)
    if (out / "meta.json").is_file():
        return Prepared(out, json.loads((out / "meta.json").read_text()))
    if isinstance(tok, BPETokenizer) and cfg.tokenizer == TRAIN_TOKENIZER:
        # A checkpoint's trained tokenizer on its own data config (evaluate task=bpb): the data
        # prepared when it was trained, if that is still in the cache, holds the same tokens.
        trained = cache_path(cfg, files, f"bpe{cfg.vocab_size}", training_key(cfg))
        if (trained / "meta.json").is_file():
            meta = json.loads((trained / "meta.json").read_text())
            if meta["tokenizer"] == tok.to_dict():
                return Prepared(trained, meta)

    files, skipped = text_files(cfg, files)
    if skipped:
        more = ", ..." if len(skipped) > 1 else ""
        print(
            f"note: skipping {len(skipped):,} of the {len(files) + len(skipped):,} files under {cfg.path} as "
            f"not UTF-8 text ({skipped[0]}{more}); the prepared data's meta.json lists them",
            file=sys.stderr,
        )
    total = sum(p.stat().st_size for p in files) or None
    t0 = time.perf_counter()
    training = None
    if tok is None and cfg.tokenizer == TRAIN_TOKENIZER:
        meter = Meter(total, "training tokenizer", verbose)
        try:
            tok, training = train_tokenizer(cfg, files, meter.read)
        finally:
            meter.close()
    if tok is None or isinstance(tok, CharTokenizer):
        meter = Meter(total, "characters", verbose)
        try:
            if tok is None:
                tok = char_vocabulary(iter_parts(cfg, files, meter.read))
            else:
                check_characters(cfg, files, tok, meter.read)
        finally:
            meter.close()

    def write(folder: Path) -> dict[str, Any]:
        meta = write_shards(cfg, files, tok, folder, total, verbose)
        if training is not None:
            paths = [folder / s["file"] for s in meta["shards"]["val"]]
            meta["tokenizer_training"] = training | compression_report(tok, paths, meta["dtype"])
        return meta | {"skipped": skipped, "seconds": round(time.perf_counter() - t0, 3)}

    write_atomically(out, write)
    meta = json.loads((out / "meta.json").read_text())
    if verbose and isinstance(tok, BPETokenizer) and "tokenizer_training" in meta:
        print(report_line(tok, meta["tokenizer_training"]))
    if verbose:
        print(
            f"prepared {meta['train_tokens'] + meta['val_tokens']:,} tokens ({tok.vocab_size:,}-token "
            f"vocabulary, {meta['parts']:,} parts, val {meta['val_tokens']:,} tokens split by "
            f"{meta['split_by']}{skipped_note(meta)}) in {out}"
        )
    return Prepared(out, meta, fresh=True)


def skipped_note(meta: dict[str, Any]) -> str:
    """The end of the prepare lines for a corpus that skipped files as not text, else ""."""
    n = len(meta.get("skipped", ()))
    return f", {n:,} file{'s' * (n > 1)} skipped as not UTF-8 text" if n else ""


def write_atomically(out: Path, write: Callable[[Path], dict[str, Any]]) -> None:
    """`write(folder)` fills a temporary folder next to `out` and returns its meta.json content; the
    folder becomes `out` only once complete, so an interrupted write never leaves a folder that a
    later run would trust (a killed process leaves a `.tmp-` folder, which nothing reads)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=out.name + ".tmp-"))
    try:
        (tmp / "meta.json").write_text(json.dumps(write(tmp), indent=2))
        try:
            os.rename(tmp, out)
        except OSError:
            # Another process prepared the same data first: theirs is equally good.
            if not (out / "meta.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_shards(
    cfg: DataConfig, files: list[Path], tok: Tokenizer, folder: Path, total: int | None, verbose: bool
) -> dict[str, Any]:
    """The second pass: tokenize, split and write; returns the meta.json content."""
    dtype = token_dtype(tok.vocab_size)
    encode = make_encoder(tok, dtype)
    sep = encode([CHAR_SEPARATOR])[0] if isinstance(tok, CharTokenizer) else np.array([tok.eot_token], dtype)
    writers = {s: ShardWriter(folder, s, dtype, cfg.shard_tokens) for s in ("train", "val")}
    splitter = Splitter(writers, cfg.val_fraction, cfg.split_seed, sep, encode)
    workers = cfg.prepare_workers or len(os.sched_getaffinity(0))
    meter = Meter(total, "tokenizing", verbose)
    counter = PartCounter()
    try:
        for part, ids in encode_parts(counter(iter_parts(cfg, files, meter.read)), encode, workers):
            splitter.add(part, ids)
            meter.wrote(ids.size)
        split_by = splitter.finish()
    finally:
        meter.close()
        for w in writers.values():
            w.close()
    if not counter.has_text:
        raise empty_corpus(cfg, files)
    return {
        "format": FORMAT_VERSION,
        "sources": len(files) if cfg.source != "hf" else cfg.path,
        "first_source": str(files[0]) if files else cfg.path,
        "tokenizer": tok.to_dict(),
        "vocab_size": tok.vocab_size,
        "dtype": dtype,
        "documents": counter.documents,
        "parts": splitter.n_parts,
        "split_by": split_by,
        "train_tokens": writers["train"].n_tokens,
        "val_tokens": writers["val"].n_tokens,
        "shards": {s: w.shards for s, w in writers.items()},
        "data": asdict(cfg),
    }
