"""Tokenized prompt -> completion examples -> packed rows -> batches, with the loss normalized per
optimizer step: the packing, the row stream, its sampler and the LightningDataModule.

An example of n tokens fills n - 1 positions of a row (inputs ids[:-1], targets ids[1:]); one
longer than a row is cut to block_size + 1 tokens. Several examples share a row of block_size
positions (data.packing=true), none split; the rest of a row is padding. A batch is a dict:

- "idx" (B, T) int64: input tokens; 0 on padding.
- "targets" (B, T) int64: the next token of the same example, or -100 (no loss) on padding and,
  with data.mask_prompt, where the target is a prompt token. The last token of an example predicts
  nothing: an example contributes only its own n - 1 pairs.
- "positions" (B, T) int64: each token's position within its own example, from 0; 0 on padding.
- "segments" (B, T) int64: which example of the row a token belongs to (0, 1, ...); -1 on padding.
- "prefix" (B, T) bool: the input token is in its example's leading prompt, before its first
  trained token (for prefix-LM attention); False on padding.
- An encoder-decoder's rows (gpt/model/encoder_decoder.py) put each example's source (the tokens
  before its last trained segment) on a source side: "source", "source_positions" and
  "source_segments" (B, T), laid out as above; its target (that segment and its end-of-text token)
  goes to "idx" (model.config.decoder_start, then the target but its last token) and "targets"
  (the target, all with a loss). There is no "prefix". An example fills the same positions on
  both sides (the longer side's), so the packing below serves both; each side is cut to block_size.
- "step_tokens" (B,) int64, all equal: the targets with a loss in the whole optimizer step this
  micro-batch belongs to, over all its micro-batches and ranks. Summing the cross-entropy of a
  micro-batch and scaling by world_size * accumulate_grad_batches / step_tokens makes the step's
  gradient the mean over the step's completion tokens, however the step is split up.

The rows form one seeded stream that the ranks share out (rank r of W takes items r, r+W, ...), so
optimizer step s covers stream items [s*G, (s+1)*G), G = W * accumulate_grad_batches * batch_size,
and each item computes its step's count from the rows alone, without communication.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from gpt.data.datamodule import GPTDataModule, ResumableSampler
from gpt.data.pairs import PreparedPairs, TokenizedExamples, prepare_pairs

IGNORE = -100  # the target that has no loss (torch's cross_entropy ignore_index)

# ----------------------------------------------------------------------------- packing


def best_fit(sizes: np.ndarray, room: int) -> np.ndarray:
    """The row of each item, sizes given largest first (best-fit decreasing): each goes into the open
    row with the least room that still fits it (the oldest of those), or opens a new one."""
    rows = np.empty(len(sizes), dtype=np.int64)
    smallest = int(sizes[-1]) if len(sizes) else 0
    open_rows: list[tuple[int, int]] = []  # (room left, row), sorted
    n_rows = 0
    for k, size in enumerate(sizes.tolist()):
        j = bisect.bisect_left(open_rows, (size, -1))
        if j < len(open_rows):
            left, row = open_rows.pop(j)
        else:
            left, row, n_rows = room, n_rows, n_rows + 1
        rows[k] = row
        if left - size >= smallest:  # room for less than the smallest size takes nothing more
            bisect.insort(open_rows, (left - size, row))
    return rows


@dataclass(frozen=True)
class EpochRows:
    """One data epoch's rows in stream order: the examples of each, and the targets before each."""

    examples: np.ndarray  # the example at each slot of the layout (an index into Packing.kept)
    rows: np.ndarray  # layout row of each stream row
    targets_before: np.ndarray  # (n_rows + 1,) targets with a loss in stream rows [0, j)


class Packing:
    """Where the examples of a split go, epoch by epoch.

    Best-fit decreasing places the example sizes (positions filled), largest first; that layout
    depends only on the sorted sizes. Each epoch shuffles the examples with (seed, epoch) and sorts
    them by size with a stable sort, which only moves examples between slots of the same size, then
    shuffles the rows. So rows change partners every epoch, yet every epoch has the same number of
    rows and of targets, and stream row g is row g % n_rows of epoch g // n_rows: found without
    replaying the epochs before it. Examples of fewer than 2 tokens fill nothing and are left out.
    """

    def __init__(
        self,
        examples: TokenizedExamples,
        block_size: int,
        mask_prompt: bool,
        packed: bool,
        seed: int,
        seq2seq: bool = False,
    ) -> None:
        if seq2seq:  # an encoder-decoder's example: the longer of its source and its target
            sizes, targets = examples.seq2seq_sizes(block_size)
        else:
            sizes, targets = (
                np.minimum(examples.lengths, block_size + 1) - 1,
                examples.targets(block_size, mask_prompt),
            )
        self.kept = np.flatnonzero(sizes > 0)  # examples that fill at least one position
        self.sizes = sizes[self.kept]
        self.targets = targets[self.kept]
        self.seed = seed
        order = np.argsort(-self.sizes, kind="stable")
        # Layout row of each slot; slots are numbered in the order they were filled.
        self.slot_row = best_fit(self.sizes[order], block_size) if packed else np.arange(len(order))
        self.n_rows = int(self.slot_row.max()) + 1 if len(order) else 0
        # The slots of layout row r, in filling order: slots[row_start[r] : row_start[r + 1]].
        self.slots = np.argsort(self.slot_row, kind="stable")
        self.row_start = np.concatenate([[0], np.cumsum(np.bincount(self.slot_row, minlength=self.n_rows))])
        self.targets_per_epoch = int(self.targets.sum())

    def epoch(self, epoch: int) -> EpochRows:
        rng = np.random.default_rng([self.seed, epoch])
        shuffled = rng.permutation(len(self.sizes))
        examples = shuffled[np.argsort(-self.sizes[shuffled], kind="stable")]
        rows = rng.permutation(self.n_rows)
        per_row = np.bincount(self.slot_row, weights=self.targets[examples], minlength=self.n_rows)
        targets_before = np.concatenate([[0], np.cumsum(per_row[rows].astype(np.int64))])
        return EpochRows(examples, rows, targets_before)

    def members(self, epoch: EpochRows, j: int) -> np.ndarray:
        """The examples (indices into the split) of stream row j of `epoch`, in row order."""
        row = epoch.rows[j]
        slots = self.slots[self.row_start[row] : self.row_start[row + 1]]
        return self.kept[epoch.examples[slots]]


def build_row(
    examples: TokenizedExamples,
    members: np.ndarray,
    block_size: int,
    mask_prompt: bool,
    decoder_start: int | None = None,
) -> dict[str, np.ndarray]:
    """One row of the batch (see the module docstring) from the examples `members`, in order; an
    encoder-decoder's when decoder_start is given."""
    if decoder_start is not None:
        return build_seq2seq_row(examples, members, block_size, decoder_start)
    row = {
        "idx": np.zeros(block_size, dtype=np.int64),
        "targets": np.full(block_size, IGNORE, dtype=np.int64),
        "positions": np.zeros(block_size, dtype=np.int64),
        "segments": np.full(block_size, -1, dtype=np.int64),
        "prefix": np.zeros(block_size, dtype=bool),
    }
    at = 0
    for segment, i in enumerate(members.tolist()):
        ids, completion = examples[i]
        first_trained = int(np.argmax(completion))  # every example has a completion
        ids, completion = ids[: block_size + 1].astype(np.int64), completion[: block_size + 1]
        n = len(ids) - 1
        here = slice(at, at + n)
        row["idx"][here] = ids[:-1]
        row["targets"][here] = np.where(completion[1:] | (not mask_prompt), ids[1:], IGNORE)
        row["positions"][here] = np.arange(n)
        row["segments"][here] = segment
        row["prefix"][here] = np.arange(n) < first_trained
        at += n
    return row


def build_seq2seq_row(
    examples: TokenizedExamples, members: np.ndarray, block_size: int, decoder_start: int
) -> dict[str, np.ndarray]:
    """An encoder-decoder's row (see the module docstring) from the examples `members`, in order."""
    row = {
        "idx": np.zeros(block_size, dtype=np.int64),
        "targets": np.full(block_size, IGNORE, dtype=np.int64),
        "positions": np.zeros(block_size, dtype=np.int64),
        "segments": np.full(block_size, -1, dtype=np.int64),
        "source": np.zeros(block_size, dtype=np.int64),
        "source_positions": np.zeros(block_size, dtype=np.int64),
        "source_segments": np.full(block_size, -1, dtype=np.int64),
    }
    at_source = at_target = 0
    for segment, i in enumerate(members.tolist()):
        ids, completion = examples[i]
        n_source = len(ids) - int(np.argmin(completion[::-1])) if not completion.all() else 0
        source = ids[:n_source][:block_size] if n_source else np.array([decoder_start])
        target = ids[n_source:][:block_size].astype(np.int64)
        s, t = len(source), len(target)
        row["source"][at_source : at_source + s] = source
        row["source_positions"][at_source : at_source + s] = np.arange(s)
        row["source_segments"][at_source : at_source + s] = segment
        here = slice(at_target, at_target + t)
        row["idx"][here] = np.concatenate([[decoder_start], target[:-1]])
        row["targets"][here] = target
        row["positions"][here] = np.arange(t)
        row["segments"][here] = segment
        at_source, at_target = at_source + s, at_target + t
    return row


def trim_source(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The batch of an encoder-decoder's rows, its source side cut after the last column that holds
    a token in any row. Sources are placed from the start of each row, and an example fills the
    positions of its longer side on both: the source side is mostly padding where targets are
    longer (words for digits), and padding changes nothing (no real query sees it), so the encoder
    runs on what the batch holds. Done here, on the host, not on the device where it would make
    the host wait for the device at every step."""
    batch = default_collate(rows)
    used = (batch["source_segments"] >= 0).any(dim=0).nonzero()
    width = int(used.max()) + 1 if len(used) else 1
    for key in ("source", "source_positions", "source_segments"):
        batch[key] = batch[key][:, :width]
    return batch


# ----------------------------------------------------------------------------- the stream and its sampler


class PackedRows(Dataset):
    """Item g: row g of a split's stream as the batch's tensors, with the count of targets in the
    `step_items` consecutive items (one optimizer step) that g belongs to.

    The stream is endless, data epoch after data epoch (training), or the rows `select` of the first
    data epoch (validation).
    """

    def __init__(
        self,
        examples: TokenizedExamples,
        packing: Packing,
        block_size: int,
        mask_prompt: bool,
        step_items: int,
        select: list[int] | None = None,
        decoder_start: int | None = None,
    ) -> None:
        self.examples, self.packing = examples, packing
        self.block_size, self.mask_prompt, self.step_items = block_size, mask_prompt, step_items
        self.select, self.decoder_start = select, decoder_start
        self._epochs: dict[int, EpochRows] = {}
        if select is not None:
            first = self._epoch(0)
            per_row = np.diff(first.targets_before)[select]
            self._select_before = np.concatenate([[0], np.cumsum(per_row)])

    def __len__(self) -> int:
        # An endless stream: the sampler chooses the items; this is one data epoch.
        return len(self.select) if self.select is not None else self.packing.n_rows

    def _epoch(self, epoch: int) -> EpochRows:
        if epoch not in self._epochs:
            if len(self._epochs) >= 2:  # the stream moves forward: keep the current and the next
                del self._epochs[min(self._epochs)]
            self._epochs[epoch] = self.packing.epoch(epoch)
        return self._epochs[epoch]

    def members(self, g: int) -> np.ndarray:
        if self.select is not None:
            return self.packing.members(self._epoch(0), self.select[g])
        epoch, j = divmod(g, self.packing.n_rows)
        return self.packing.members(self._epoch(epoch), j)

    def targets_before(self, g: int) -> int:
        """Targets with a loss in stream items [0, g)."""
        if self.select is not None:
            return int(self._select_before[min(g, len(self.select))])
        epoch, j = divmod(g, self.packing.n_rows)
        within = int(self._epoch(epoch).targets_before[j]) if j else 0
        return epoch * self.packing.targets_per_epoch + within

    def __getitem__(self, g: int) -> dict[str, torch.Tensor]:
        row = build_row(self.examples, self.members(g), self.block_size, self.mask_prompt, self.decoder_start)
        step = g - g % self.step_items
        row["step_tokens"] = np.int64(self.targets_before(step + self.step_items) - self.targets_before(step))
        return {k: torch.from_numpy(np.asarray(v)) for k, v in row.items()}


class StreamSampler(ResumableSampler):
    """Items of an endless stream that the ranks share out: Lightning epoch E is stream items
    [E*L*W, (E+1)*L*W) for L = `length` per rank and W ranks, of which rank r takes r, r+W, ..."""

    def __init__(self, length: int, rank: int = 0, world_size: int = 1) -> None:
        super().__init__()
        self.length, self.rank, self.world_size = length, rank, world_size

    def __iter__(self) -> Iterator[int]:
        first = (self.epoch * self.length + self.start) * self.world_size + self.rank
        yield from range(first, (self.epoch + 1) * self.length * self.world_size, self.world_size)


# ----------------------------------------------------------------------------- the data module


class PairsDataModule(GPTDataModule):
    """GPTDataModule for data.source=pairs: the same constructor, tokenizer, loader settings and exact
    resume (state_dict() counts the samples of the epoch already trained on), over packed rows.

    Validation scores the first data.val_windows rows of the val split (all of them when null),
    packed once with split_seed, rows in a seeded order, so that a partial set is not biased towards
    the longest examples, which best-fit places first. The same rows every validation.

    decoder_start: an encoder-decoder's (model.config.decoder_start), for its rows; None: a decoder's.
    """

    _prepared: PreparedPairs | None

    def __init__(self, *args: Any, decoder_start: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.decoder_start = decoder_start

    @property
    def prepared(self) -> PreparedPairs:
        if self._prepared is None:
            prepared = prepare_pairs(self.cfg)
            prepared.check_fits(self.block_size)  # before setup(), as GPTDataModule does
            self._prepared = prepared
        return self._prepared

    def setup(self, stage: str | None = None) -> None:
        cfg, prepared = self.cfg, self.prepared
        self.train_examples, self.val_examples = prepared.examples("train"), prepared.examples("val")
        seq2seq = self.decoder_start is not None
        self.train_packing = Packing(
            self.train_examples, self.block_size, cfg.mask_prompt, cfg.packing, self.seed, seq2seq
        )
        self.val_packing = Packing(
            self.val_examples, self.block_size, cfg.mask_prompt, cfg.packing, cfg.split_seed, seq2seq
        )

    def _accumulate(self) -> int:
        return self.trainer.accumulate_grad_batches if self.trainer is not None else 1

    def _samples_per_epoch(self) -> int:
        trainer = self.trainer
        if trainer is not None and trainer.max_steps > 0:
            return super()._samples_per_epoch()
        # Epoch-based training: the whole optimizer steps that one data epoch fills.
        per_step = self._accumulate() * self.cfg.batch_size  # samples of one step, on each rank
        return max(1, self.train_packing.n_rows // (per_step * self._rank_and_world()[1])) * per_step

    def train_dataloader(self) -> DataLoader:
        rank, world = self._rank_and_world()
        cfg = self.cfg
        step_items = world * self._accumulate() * cfg.batch_size
        dataset = PackedRows(
            self.train_examples,
            self.train_packing,
            self.block_size,
            cfg.mask_prompt,
            step_items,
            decoder_start=self.decoder_start,
        )
        sampler = StreamSampler(self._samples_per_epoch(), rank, world)
        if self._resume is not None:
            sampler.load_state_dict(self._resume)
            self._resume = None  # later epochs start from their beginning
        self.train_sampler = sampler
        return self._loader(dataset, sampler, self._collate)

    def val_dataloader(self) -> DataLoader:
        rank, world = self._rank_and_world()
        n_rows = self.val_packing.n_rows
        chosen = list(range(min(n_rows, self.cfg.val_windows or n_rows)))[rank::world]
        dataset = PackedRows(
            self.val_examples,
            self.val_packing,
            self.block_size,
            self.cfg.mask_prompt,
            self.cfg.batch_size,
            chosen,
            self.decoder_start,
        )
        return self._loader(dataset, None, self._collate)

    @property
    def _collate(self) -> Callable[[list], Any] | None:
        return trim_source if self.decoder_start is not None else None
