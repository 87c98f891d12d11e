"""Token shards -> (x, y) windows, without Lightning: what training, validation and evaluate task=bpb read.

A split's shards are read as one token stream: a window may span the boundary between two shards, so
every offset of the split is a window start. `val_offsets` picks the windows validation scores, so
that evaluate can score exactly those.
"""

from __future__ import annotations

import bisect
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

# Windows of the full validation set: data.val_windows=null picks this many where scoring is cheap.
FULL_VAL_WINDOWS = 512


class Windows(Dataset):
    """Item i is (x, y): the block_size tokens starting at offset i of the split and the same shifted by one.

    The shards are memory-mapped lazily, so each DataLoader worker opens them once, in its own process.
    """

    def __init__(self, paths: list[Path], dtype: str, block_size: int) -> None:
        self.paths, self.dtype, self.block_size = list(paths), dtype, block_size
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

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        chunk = torch.from_numpy(self.read(i, i + self.block_size + 1).astype(np.int64))
        return chunk[:-1], chunk[1:]


def val_offsets(n_tokens: int, block_size: int, n_windows: int) -> list[int]:
    """Evenly spaced windows over the whole split: the same every validation, every run."""
    last = n_tokens - block_size - 1
    return torch.linspace(0, last, n_windows).round().long().unique().tolist()
