"""A preallocated key/value cache, created by the caller and passed into `GPT.forward`.

The model holds no inference state: generation creates a `KVCache`, each attention layer writes
its new keys and values at their slots, and `GPT.forward` advances the position once, after the
layer loop. Storage is allocated once for the whole generation. A compiled decode step attends over
all of it (masked), so shapes never change and it never recompiles; the position is a tensor for
the same reason (gpt-fast's `input_pos`). Eagerly, attention reads only the slots filled so far.
An encoder-decoder's source (cross-attention keys and values) is held here too, computed once.
"""

from __future__ import annotations

import torch

from gpt.config import ModelConfig


class KVCache:
    def __init__(
        self,
        n_layer: int,
        batch_size: int,
        n_head: int,
        head_dim: int,
        max_len: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        # One tensor per layer, (B, nh, max_len, hs): under torch.compile, a write into a view of
        # one big tensor is turned into a copy of all of it at every step; separate tensors are
        # updated in place.
        shape = (batch_size, n_head, max_len, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.max_len = max_len
        self.pos = torch.zeros((), dtype=torch.long, device=device)  # number of slots already filled
        # An encoder-decoder's source, set once by encode_into: each decoder layer's cross-attention
        # keys and values (B, nh, S, hs), and which source slots are real (B, 1, 1, S) bool.
        self.cross_k: list[torch.Tensor] = []
        self.cross_v: list[torch.Tensor] = []
        self.cross_mask: torch.Tensor | None = None

    @classmethod
    def for_model(
        cls,
        config: ModelConfig,
        batch_size: int,
        max_len: int | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> KVCache:
        max_len = config.block_size if max_len is None else max_len
        if max_len > config.block_size:
            raise ValueError(f"cache length {max_len} exceeds block_size {config.block_size}")
        return cls(config.n_layer, batch_size, config.n_head, config.head_dim, max_len, device, dtype)

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, nh, T, hs) at `slots` (T,); return this layer's whole storage.

        Returns two tensors of shape (B, nh, max_len, hs); slots not written yet must be masked.
        """
        self.k[layer][:, :, slots] = k
        self.v[layer][:, :, slots] = v
        return self.k[layer], self.v[layer]

    def set_source(self, k: list[torch.Tensor], v: list[torch.Tensor], mask: torch.Tensor) -> None:
        """Hold an encoder-decoder's source for every decoder step (kept across reset())."""
        self.cross_k, self.cross_v, self.cross_mask = k, v, mask

    def advance(self, n: int) -> None:
        self.pos += n

    def reset(self) -> None:
        self.pos.zero_()

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep rows[i] as row i (beam search: each surviving beam takes its parent's cache)."""
        for cache in (*self.k, *self.v):
            cache.copy_(cache[rows])
        if self.cross_k:
            self.cross_k = [k[rows] for k in self.cross_k]
            self.cross_v = [v[rows] for v in self.cross_v]
            self.cross_mask = self.cross_mask[rows]
