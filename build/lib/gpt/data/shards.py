"""Token arrays -> shard files: the seeded train/val splitter and the writer of `{split}-NNNNN.bin` shards."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from gpt.data.encode import Part

# Fewer documents than this are too few to split by document: the corpus is split by tokens
# instead (the last val_fraction of its tokens), so a short note still gets a validation split and
# a one-file corpus such as Tiny Shakespeare keeps the split the field compares results on. Parts
# are buffered to decide; past this many tokens the corpus is split by part regardless.
MIN_DOCUMENTS_TO_SPLIT_BY_DOCUMENT = 10
MAX_TOKENS_TO_SPLIT_BY_TOKENS = 1 << 24

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
    """Routes tokenized parts to the train and val writers (see the module docstring, step 4).

    The last part of each split is held back until the next one arrives, so that at the end a split
    that got no part can take the other split's last one instead of being empty.
    """

    def __init__(self, writers: dict[str, ShardWriter], val_fraction: float, seed: int, sep: np.ndarray):
        self.writers, self.val_fraction, self.sep = writers, val_fraction, sep
        self.rng = random.Random(seed)
        self.first: list[tuple[Part, np.ndarray, str]] = []
        self.held: dict[str, tuple[Part, np.ndarray] | None] = {"train": None, "val": None}
        self.last: dict[str, Part | None] = {"train": None, "val": None}
        self.n_parts = 0
        self.credit = 0.0
        self.by_document = False
        self.first_docs: set[int] = set()
        self.first_tokens = 0

    def add(self, part: Part, ids: np.ndarray) -> None:
        # Randomized error diffusion: a part goes to val with probability `credit`, the val_fraction
        # accumulated since the last val part. The count of val parts stays within one of
        # val_fraction x parts, even for a few dozen parts, while which ones is drawn at random.
        self.credit += self.val_fraction
        split = "val" if self.rng.random() < self.credit else "train"
        self.credit -= split == "val"
        self.n_parts += 1
        if self.by_document:
            self._route(part, ids, split)
            return
        self.first.append((part, ids, split))
        self.first_docs.add(part.doc)
        self.first_tokens += len(ids)
        if (
            len(self.first_docs) >= MIN_DOCUMENTS_TO_SPLIT_BY_DOCUMENT
            or self.first_tokens >= MAX_TOKENS_TO_SPLIT_BY_TOKENS
        ):
            self.by_document = True
            for args in self.first:
                self._route(*args)
            self.first = []

    def _route(self, part: Part, ids: np.ndarray, split: str) -> None:
        if self.held[split] is not None:
            self._write(split, *self.held[split])
        self.held[split] = (part, ids)

    def _write(self, split: str, part: Part, ids: np.ndarray) -> None:
        last = self.last[split]
        if last is not None and not (last.doc == part.doc and last.index + 1 == part.index):
            self.writers[split].write(self.sep)
        self.writers[split].write(ids)
        self.last[split] = part

    def finish(self) -> str:
        """Write what is held back; returns how the corpus was split ("documents" or "tokens")."""
        if not self.by_document:
            return self._split_by_tokens()
        for split, other in (("val", "train"), ("train", "val")):
            if self.held[split] is None and self.last[split] is None:
                self.held[split], self.held[other] = self.held[other], None
        for split in ("train", "val"):
            if self.held[split] is not None:
                self._write(split, *self.held[split])
        return "documents"

    def _split_by_tokens(self) -> str:
        # Only reached with few documents and tokens, all held in self.first.
        stream: list[np.ndarray] = []
        last: Part | None = None
        for part, ids, _ in self.first:
            if last is not None and not (last.doc == part.doc and last.index + 1 == part.index):
                stream.append(self.sep)
            stream.append(ids)
            last = part
        ids = np.concatenate(stream) if stream else self.sep[:0]
        n_val = int(len(ids) * self.val_fraction)
        self.writers["train"].write(ids[: len(ids) - n_val])
        self.writers["val"].write(ids[len(ids) - n_val :])
        return "tokens"
