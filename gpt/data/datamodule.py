"""Token shards -> training batches: seeded resumable samplers and the LightningDataModule.

The shards come from `gpt.data.prepare.prepare` (the data module's prepare_data() calls it) and are
read as windows by `gpt.data.windows` (re-exported here), which needs no Lightning. A split's shards
are one token stream, so every offset of the split is a window start and the sequential mode covers
every token. With data.doc_mask a batch is (x, y, positions, segments) instead of (x, y).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.utilities.data import suggested_max_num_workers
from torch.utils.data import DataLoader, Dataset, Sampler

from gpt.config import DataConfig
from gpt.data.prepare import Prepared, prepare
from gpt.data.windows import Windows, document_separator, val_offsets
from gpt.errors import UserError
from gpt.tokenizer import Tokenizer

__all__ = [
    "GPTDataModule",
    "Prepared",
    "RandomWindowSampler",
    "SequentialWindowSampler",
    "Windows",
    "prepare",
    "val_offsets",
]

# ----------------------------------------------------------------------------- samplers


class ResumableSampler(Sampler[int]):
    """What both samplers share: `epoch`, and `start`, the samples of this epoch already consumed.

    state_dict() / load_state_dict() carry exactly these two numbers, so a restored sampler continues
    with the sample where the checkpoint stopped. set_epoch() to a new epoch starts it from its first
    sample; to the current epoch (as Lightning does on resume) it keeps `start`.
    """

    length: int  # samples this rank yields per epoch

    def __init__(self) -> None:
        self.epoch = 0
        self.start = 0  # items of this epoch already consumed (set when resuming)

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.start = epoch, 0

    def __len__(self) -> int:
        # The full epoch, also when resuming: Lightning counts the batches it already trained on.
        return self.length

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "start": self.start}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.start = state["epoch"], state["start"]


class RandomWindowSampler(ResumableSampler):
    """Uniformly random window offsets from one seeded stream that the ranks share out.

    The stream depends on (seed, epoch) only; rank r of W takes items r, r+W, r+2W, ... So a
    global batch holds the same windows whatever the number of devices, accumulation steps and
    micro-batch size that make it up. The stream is drawn in fixed-size chunks, chunk c from its
    own generator, so it can restart at any position without replaying what came before.
    """

    CHUNK = 1 << 16

    def __init__(self, n_windows: int, length: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        super().__init__()
        self.n_windows, self.length, self.seed = n_windows, length, seed
        self.rank, self.world_size = rank, world_size

    def _chunk(self, c: int) -> torch.Tensor:
        words = np.random.SeedSequence([self.seed, self.epoch, c]).generate_state(2)
        g = torch.Generator().manual_seed(int(words[0]) << 31 ^ int(words[1]))
        return torch.randint(self.n_windows, (self.CHUNK,), generator=g)

    def __iter__(self) -> Iterator[int]:
        # This rank's item i is item i * world_size + rank of the shared stream.
        i = self.start
        while i < self.length:
            g = i * self.world_size + self.rank
            c, j = divmod(g, self.CHUNK)
            take = min(len(range(j, self.CHUNK, self.world_size)), self.length - i)
            yield from self._chunk(c)[j :: self.world_size][:take].tolist()
            i += take


class SequentialWindowSampler(ResumableSampler):
    """Back-to-back windows in corpus order: each token is an input once per epoch.

    Window k starts at k * block_size (its targets run one token further, into the next window).
    Rank r of world_size takes the r-th contiguous block of windows, so ranks never share a window;
    each rank gets the same number (the few windows left over are dropped), as DDP needs.
    """

    def __init__(self, n_tokens: int, block_size: int, rank: int = 0, world_size: int = 1) -> None:
        super().__init__()
        self.block_size = block_size
        self.length = (n_tokens - 1) // block_size // world_size
        self.first = rank * self.length

    def __iter__(self) -> Iterator[int]:
        for k in range(self.first + self.start, self.first + self.length):
            yield k * self.block_size


class GPTDataModule(L.LightningDataModule):
    """`prepared`: the tokenized corpus if the caller already has it (train.py prepares it, and
    checks it fits the model, before it imports Lightning); otherwise prepared on first use."""

    def __init__(
        self, cfg: DataConfig, block_size: int, seed: int = 0, prepared: Prepared | None = None
    ) -> None:
        super().__init__()
        self.cfg, self.block_size, self.seed = cfg, block_size, seed
        self._prepared = prepared
        if prepared is not None:
            prepared.check_fits(block_size)
        self._resume: dict[str, int] | None = None  # sampler state from a checkpoint

    @property
    def prepared(self) -> Prepared:
        if self._prepared is None:
            prepared = prepare(self.cfg)
            # Checked here, on first use, not in setup(): by then loggers and callbacks could
            # write into the run dir.
            prepared.check_fits(self.block_size)
            self._prepared = prepared
        return self._prepared

    @property
    def tokenizer(self) -> Tokenizer:
        return self.prepared.tokenizer()

    def prepare_data(self) -> None:
        self.prepared  # noqa: B018  (tokenizes on first access)

    def setup(self, stage: str | None = None) -> None:
        meta = self.prepared.meta  # checks that each split holds a window
        # data.doc_mask: windows carry their documents' positions and segments; random training
        # windows start at a document start, validation scores the same windows as without it.
        sep = document_separator(self.tokenizer) if self.cfg.doc_mask else None
        align = self.cfg.sampling == "random"  # sequential keeps every token once per epoch
        self.train_set = Windows(
            self.prepared.shard_paths("train"), meta["dtype"], self.block_size, sep, align
        )
        self.val_set = Windows(self.prepared.shard_paths("val"), meta["dtype"], self.block_size, sep)

    def _samples_per_epoch(self) -> int:
        trainer = self.trainer
        if trainer is not None and trainer.max_steps > 0:
            return trainer.max_steps * trainer.accumulate_grad_batches * self.cfg.batch_size
        # Epoch-based training: an epoch draws as many windows as fit side by side in the split.
        return max(1, self.train_set.n_tokens // self.block_size)

    def _rank_and_world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def train_dataloader(self) -> DataLoader:
        rank, world = self._rank_and_world()
        if self.cfg.sampling == "sequential":
            sampler = SequentialWindowSampler(self.train_set.n_tokens, self.block_size, rank, world)
            if len(sampler) == 0:
                raise UserError(
                    f"the train split ({self.train_set.n_tokens} tokens) has fewer back-to-back windows of "
                    f"{self.block_size} tokens than there are ranks ({world}); use more text or "
                    "data.sampling=random"
                )
        else:
            sampler = RandomWindowSampler(
                len(self.train_set), self._samples_per_epoch(), self.seed, rank, world
            )
        if self._resume is not None:
            sampler.load_state_dict(self._resume)
            self._resume = None  # later epochs start from their beginning
        # Kept so that the training loop can save and restore its state (see ResumableSampler).
        self.train_sampler = sampler
        return self._loader(self.train_set, sampler)

    def state_dict(self) -> dict[str, int]:
        """Where the training stream stands: the micro-batches of this epoch already trained on.

        Counted from the trainer's progress rather than the sampler's iterator, which runs ahead
        of training by whatever the DataLoader and Lightning prefetch.
        """
        trainer = self.trainer
        done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        return {"epoch": trainer.current_epoch, "start": done * self.cfg.batch_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._resume = dict(state)

    def val_dataloader(self) -> DataLoader:
        # Each rank scores its share of the windows; the token-weighted mean is synced by the metric.
        rank, world = self._rank_and_world()
        offsets = val_offsets(self.val_set.n_tokens, self.block_size, self.cfg.val_windows)[rank::world]
        return self._loader(torch.utils.data.Subset(self.val_set, offsets), None)

    def _device_type(self) -> str:
        """The type of the device training runs on: the trainer's, else cuda where there is one."""
        if self.trainer is not None:
            return self.trainer.strategy.root_device.type
        return "cuda" if torch.cuda.is_available() else "cpu"

    @property
    def num_workers(self) -> int:
        """data.num_workers, or when null (auto): 0 on a CPU, where reading a batch costs microseconds
        and a worker only adds a process; on a GPU, min(4, Lightning's suggestion: the usable CPU
        cores per device on this machine less one for the training process), at least 1, so the
        next batches are read while the GPU computes. Resuming stays exact with workers: state_dict()
        counts the batches trained on, not those the workers have read ahead."""
        if self.cfg.num_workers is not None:
            return self.cfg.num_workers
        if self._device_type() != "cuda":
            return 0
        devices = self.trainer.num_devices if self.trainer is not None else 1
        return min(4, suggested_max_num_workers(devices))

    def _loader(
        self, dataset: Dataset, sampler: Sampler | None, collate_fn: Callable[[list], Any] | None = None
    ) -> DataLoader:
        workers = self.num_workers
        return DataLoader(
            dataset,
            batch_size=self.cfg.batch_size,
            collate_fn=collate_fn,
            sampler=sampler,
            shuffle=False,
            num_workers=workers,
            # Pinned host memory makes the copy to a GPU asynchronous: Lightning moves each batch
            # with .to(device, non_blocking=True) on CUDA (lightning.fabric.utilities.apply_func
            # move_data_to_device, for every tensor of the tuple or dict), so the host does not
            # wait for the copy. Without a GPU pinning only costs.
            pin_memory=self._device_type() == "cuda",
            persistent_workers=workers > 0,
            # A DataLoader seeds its workers from the global RNG unless given its own generator;
            # that draw would shift dropout's random stream between a resumed and an
            # uninterrupted run. Nothing in the data path is random beyond the sampler.
            generator=torch.Generator().manual_seed(self.seed),
        )
