"""Token arrays -> shard files: the seeded train/val splitter and the writer of `{split}-NNNNN.bin` shards."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from gpt.data.encode import Part

# Fewer documents than this are too few to split by document: the corpus is split by characters
# instead (the last val_fraction of its text), so a short note still gets a validation split and
# a one-file corpus such as Tiny Shakespeare keeps the split the field compares results on, the
# same text whatever the tokenizer. Parts are buffered, with their text, to decide; past this many
# tokens the corpus is split by part regardless, so that memory stays bounded.
MIN_DOCUMENTS_TO_SPLIT_BY_DOCUMENT = 10
MAX_TOKENS_TO_SPLIT_BY_CHARACTERS = 1 << 24

# ----------------------------------------------------------------------------- the split


def char_cut(n_chars: int, val_fraction: float) -> int:
    """Split by characters, where the corpus text (n_chars, separators not counted) is cut: the last
    int(n_chars * val_fraction) characters go to val."""
    return n_chars - int(n_chars * val_fraction)


class Draws:
    """Which split each part goes to, split by document: randomized error diffusion. A part goes to
    val with probability `credit`, the val_fraction accumulated since the last val part, so the count
    of val parts stays within one of val_fraction x parts, even for a few dozen parts, while which
    ones is drawn at random. The splitter and the tokenizer trainer (which must not see val) draw
    the same sequence from the same seed."""

    def __init__(self, val_fraction: float, seed: int) -> None:
        self.val_fraction = val_fraction
        self.rng = random.Random(seed)
        self.credit = 0.0

    def __call__(self) -> str:
        self.credit += self.val_fraction
        split = "val" if self.rng.random() < self.credit else "train"
        self.credit -= split == "val"
        return split


# ----------------------------------------------------------------------------- writing shards


class ShardWriter:
    """Appends tokens to `{split}-00000.bin`, `{split}-00001.bin`, ... of at most shard_tokens each."""

    def __init__(self, folder: Path, split: str, dtype: str, shard_tokens: int) -> None:
        self.folder, self.split, self.dtype, self.shard_tokens = folder, split, dtype, shard_tokens
        self.shards: list[dict[str, Any]] = []
        self.n_tokens = 0
        self._file: BinaryIO | None = None

    def write(self, ids: np.ndarray) -> None:
        ids = ids.astype(self.dtype, copy=False)
        while ids.size:
            if self._file is None or self.shards[-1]["tokens"] == self.shard_tokens:
                self._next_shard()
            room = self.shard_tokens - self.shards[-1]["tokens"]
            head, ids = ids[:room], ids[room:]
            self._file.write(head.tobytes())
            self.shards[-1]["tokens"] += head.size
            self.n_tokens += head.size

    def _next_shard(self) -> None:
        if self._file is not None:
            self._file.close()
        name = f"{self.split}-{len(self.shards):05d}.bin"
        self._file = open(self.folder / name, "wb")  # noqa: SIM115  (closed in _next_shard / close)
        self.shards.append({"file": name, "tokens": 0})

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class Splitter:
    """Routes tokenized parts to the train and val writers (see gpt/data/prepare.py, step 4).

    Split by document, the last part of each split is held back until the next one arrives, so
    that at the end a split that got no part can take the other split's last one instead of being
    empty. Split by characters, the part holding the cut is tokenized again, as two pieces, with
    `encode` (texts -> token arrays).
    """

    def __init__(
        self,
        writers: dict[str, ShardWriter],
        val_fraction: float,
        seed: int,
        sep: np.ndarray,
        encode: Callable[[list[str]], list[np.ndarray]],
    ):
        self.writers, self.val_fraction, self.sep, self.encode = writers, val_fraction, sep, encode
        self.draw = Draws(val_fraction, seed)
        self.first: list[tuple[Part, np.ndarray, str]] = []
        self.held: dict[str, tuple[Part, np.ndarray] | None] = {"train": None, "val": None}
        self.last: dict[str, Part | None] = {"train": None, "val": None}
        self.n_parts = 0
        self.by_document = False
        self.first_docs: set[int] = set()
        self.first_tokens = 0

    def add(self, part: Part, ids: np.ndarray) -> None:
        """Take the next part of the corpus, its text still in it, and its tokens."""
        split = self.draw()
        self.n_parts += 1
        if self.by_document:
            self._route(part, ids, split)
            return
        self.first.append((part, ids, split))
        self.first_docs.add(part.doc)
        self.first_tokens += len(ids)
        if (
            len(self.first_docs) >= MIN_DOCUMENTS_TO_SPLIT_BY_DOCUMENT
            or self.first_tokens >= MAX_TOKENS_TO_SPLIT_BY_CHARACTERS
        ):
            self.by_document = True
            for args in self.first:
                self._route(*args)
            self.first = []

    def _route(self, part: Part, ids: np.ndarray, split: str) -> None:
        if self.held[split] is not None:
            self._write(split, *self.held[split])
        self.held[split] = (Part(part.doc, part.index), ids)  # split by document: the text is not needed

    def _write(self, split: str, part: Part, ids: np.ndarray) -> None:
        last = self.last[split]
        if last is not None and not (last.doc == part.doc and last.index + 1 == part.index):
            self.writers[split].write(self.sep)
        self.writers[split].write(ids)
        self.last[split] = part

    def finish(self) -> str:
        """Write what is held back; returns how the corpus was split ("documents" or "characters")."""
        if not self.by_document:
            return self._split_by_characters()
        for split, other in (("val", "train"), ("train", "val")):
            if self.held[split] is None and self.last[split] is None:
                self.held[split], self.held[other] = self.held[other], None
        for split in ("train", "val"):
            if self.held[split] is not None:
                self._write(split, *self.held[split])
        return "documents"

    def _split_by_characters(self) -> str:
        """The last int(n_chars * val_fraction) characters of the corpus text (separators not
        counted) to val, the rest to train: the same text for every tokenizer. The part holding the
        cut is tokenized again as two pieces, the text before the cut and after, as nanoGPT
        tokenizes its two splits. For characters and one document, val is the last
        int(n_tokens * val_fraction) tokens."""
        # Only reached with few documents and tokens, all held in self.first with their text.
        n_chars = sum(len(part.text) for part, _, _ in self.first)
        cut = char_cut(n_chars, self.val_fraction)
        start = 0
        for part, ids, _ in self.first:
            end = start + len(part.text)
            if end <= cut:
                self._write("train", part, ids)
            elif start >= cut:
                self._write("val", part, ids)
            else:
                head, tail = self.encode([part.text[: cut - start], part.text[cut - start :]])
                self._write("train", part, head)
                self._write("val", part, tail)
            start = end
        return "characters"
