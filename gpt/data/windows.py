"""Token shards -> (x, y) windows, without Lightning: what training, validation and evaluate task=bpb read.

A split's shards are read as one token stream: a window may span the boundary between two shards, so
every offset of the split is a window start. `val_offsets` picks the windows validation scores, so
that evaluate can score exactly those.

With data.doc_mask a window also carries each token's position within its document and which
document of the window it belongs to (`document_positions`), and training windows are aligned to
document starts (`Windows.aligned_start`): docs/data.md, "Document masks".
"""

from __future__ import annotations

import bisect
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from gpt.errors import UserError
from gpt.tokenizer import CharTokenizer, Tokenizer

# Windows of the full validation set: data.val_windows=null picks this many where scoring is cheap.
FULL_VAL_WINDOWS = 512


class Windows(Dataset):
    """Item i is (x, y): the block_size tokens starting at offset i of the split and the same shifted by one.

    `separator` (data.doc_mask: the end-of-text token between documents): item i is (x, y,
    positions, segments) instead, positions and segments (block_size,) as document_positions gives
    them. `align` (training windows drawn at random) moves a window to the first document start at
    or after offset i within it (aligned_start). The shards are memory-mapped lazily, so each
    DataLoader worker opens them once, in its own process.
    """

    def __init__(
        self,
        paths: list[Path],
        dtype: str,
        block_size: int,
        separator: int | None = None,
        align: bool = False,
    ) -> None:
        self.paths, self.dtype, self.block_size = list(paths), dtype, block_size
        self.separator, self.align = separator, align and separator is not None
        sizes = [os.path.getsize(p) // np.dtype(dtype).itemsize for p in self.paths]
        self.starts = np.cumsum([0, *sizes]).tolist()  # token offset of each shard; the last is the total
        self.n_tokens = self.starts[-1]
        self._maps: list[np.memmap] | None = None

    def __len__(self) -> int:
        return max(0, self.n_tokens - self.block_size)

    def __getstate__(self) -> dict[str, Any]:
        # Workers started by spawn get the paths, not copies of mapped memory.
        return self.__dict__ | {"_maps": None}

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of the split, across shard boundaries."""
        if self._maps is None:
            self._maps = [np.memmap(p, dtype=self.dtype, mode="r") for p in self.paths]
        pieces = []
        shard = bisect.bisect_right(self.starts, start) - 1
        while start < stop:
            lo = start - self.starts[shard]
            take = min(stop, self.starts[shard + 1]) - start
            pieces.append(self._maps[shard][lo : lo + take])
            start += take
            shard += 1
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    def aligned_start(self, i: int) -> int:
        """Where the window drawn at offset i starts: at i if a document starts there (at a
        separator, or the split's first token); else at the first separator among its inputs,
        offsets i + 1 .. i + block_size - 1, that is still a window start; at i where there is none
        (inside a document longer than a window, which so stays covered)."""
        if i == 0:
            return 0
        ahead = self.read(i, min(i + self.block_size, len(self)))
        hits = np.flatnonzero(ahead == self.separator)
        return i + int(hits[0]) if hits.size else i

    def __getitem__(self, i: int) -> tuple[torch.Tensor, ...]:
        start = self.aligned_start(i) if self.align else i
        chunk = torch.from_numpy(self.read(start, start + self.block_size + 1).astype(np.int64))
        x, y = chunk[:-1], chunk[1:]
        if self.separator is None:
            return x, y
        return x, y, *document_positions(x, self.separator)


def document_positions(x: torch.Tensor, separator: int) -> tuple[torch.Tensor, torch.Tensor]:
    """positions and segments (T,) of a window x (T,) of documents, each one's separator first:
    a new segment starts at each separator (and at the window's first token), and positions count
    from 0 at each segment's start."""
    starts = x == separator
    starts[0] = True
    index = torch.arange(len(x))
    segments = starts.long().cumsum(0) - 1  # (T,)
    first = torch.where(starts, index, 0).cummax(0).values  # (T,) where each token's segment starts
    return index - first, segments


def document_separator(tokenizer: Tokenizer) -> int:
    """The token that starts each document of a prepared text corpus (data.doc_mask)."""
    if isinstance(tokenizer, CharTokenizer) or tokenizer.eot_token is None:
        raise UserError(
            "data.doc_mask=true needs an end-of-text token between documents, and this corpus was "
            "tokenized by characters (documents separated by a blank line, which also occurs inside "
            "text): use a BPE tokenizer or drop data.doc_mask"
        )
    return tokenizer.eot_token


def val_offsets(n_tokens: int, block_size: int, n_windows: int) -> list[int]:
    """Evenly spaced windows over the whole split: the same every validation, every run."""
    last = n_tokens - block_size - 1
    return torch.linspace(0, last, n_windows).round().long().unique().tolist()
