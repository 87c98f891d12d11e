"""Loading: windows over shards, the two samplers (seeded, resumable, per rank), the data module."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import lightning.fabric.utilities.data as lightning_data
import numpy as np
import pytest
import torch

from gpt.data.datamodule import (
    GPTDataModule,
    RandomWindowSampler,
    SequentialWindowSampler,
    Windows,
    prepare,
    val_offsets,
)
from gpt.errors import ConfigError, UserError
from tests.helpers import bare_trainer, fake_trainer, split_tokens, text_cfg, write_documents


def test_windows_are_shifted_by_one(tiny_corpus, tmp_path):
    prepared = prepare(text_cfg(tiny_corpus, tmp_path, tokenizer="char"))
    ds = Windows(prepared.shard_paths("train"), prepared.meta["dtype"], block_size=16)
    assert len(ds) == 36_000 - 16
    x, y = ds[100]
    tokens = torch.from_numpy(split_tokens(prepared, "train")[100:117].astype(np.int64))
    assert x.dtype == torch.long and x.shape == (16,)
    assert torch.equal(x, tokens[:16]) and torch.equal(y, tokens[1:])


def test_windows_span_shard_boundaries(tmp_path):
    """Shards of 1,024 tokens read as one stream: every window equals the same slice of the whole."""
    tokens = np.random.default_rng(0).integers(0, 50_000, 5_000).astype(np.uint16)
    paths = []
    for i, start in enumerate(range(0, len(tokens), 1024)):
        paths.append(tmp_path / f"train-{i:05d}.bin")
        tokens[start : start + 1024].tofile(paths[-1])
    ds = Windows(paths, "uint16", block_size=64)
    assert ds.n_tokens == 5_000 and len(ds) == 5_000 - 64
    whole = torch.from_numpy(tokens.astype(np.int64))
    for i in [0, 1024 - 65, 1024 - 64, 1024 - 1, 1024, 2048 - 30, 4096 - 10, len(ds) - 1]:
        x, y = ds[i]
        assert torch.equal(x, whole[i : i + 64]) and torch.equal(y, whole[i + 1 : i + 65]), i
    tiny = Windows(paths, "uint16", block_size=2_500)  # a window longer than a shard spans three
    assert torch.equal(tiny[1000][0], whole[1000:3500])


def test_random_sampler_is_seeded_and_resumable():
    a = list(RandomWindowSampler(1000, 200_000, seed=1))
    assert a == list(RandomWindowSampler(1000, 200_000, seed=1))
    assert a != list(RandomWindowSampler(1000, 200_000, seed=2))
    assert min(a) >= 0 and max(a) == 999 and len(a) == 200_000
    resumed = RandomWindowSampler(1000, 200_000, seed=1)
    resumed.load_state_dict({"epoch": 0, "start": 70_000})  # past a chunk boundary
    assert list(resumed) == a[70_000:]
    assert len(resumed) == 200_000  # the full epoch: Lightning counts the batches already trained on


@pytest.mark.parametrize("kind", ["random", "sequential"])
def test_sampler_state_round_trip(kind):
    def make():
        if kind == "random":
            return RandomWindowSampler(500, 3_000, seed=4, rank=1, world_size=2)
        return SequentialWindowSampler(50_000, 16, rank=1, world_size=2)

    run = make()
    run.set_epoch(2)
    epoch2 = list(run)
    run.start = 1_234  # what a training loop records after consuming 1,234 samples of epoch 2
    state = run.state_dict()
    assert state == {"epoch": 2, "start": 1_234}
    restored = make()
    restored.load_state_dict(state)
    restored.set_epoch(2)  # Lightning sets the restored epoch again on resume: start is kept
    assert list(restored) == epoch2[1_234:]
    restored.set_epoch(3)  # a new epoch starts from its first sample
    assert restored.state_dict() == {"epoch": 3, "start": 0} and len(list(restored)) == len(epoch2)


def test_random_sampler_ranks_share_out_one_stream_and_epochs_differ():
    r0 = list(RandomWindowSampler(10_000, 100, seed=1, rank=0, world_size=2))
    r1 = list(RandomWindowSampler(10_000, 100, seed=1, rank=1, world_size=2))
    assert r0 != r1 and len(set(r0) & set(r1)) < 10
    one = list(RandomWindowSampler(10_000, 200, seed=1))
    assert one[0::2] == r0 and one[1::2] == r1  # the same global stream on 1 or 2 devices
    s = RandomWindowSampler(10_000, 100, seed=1, rank=0, world_size=2)
    s.set_epoch(1)
    assert list(s) != r0


def test_sequential_sampler_visits_every_token_once():
    n_tokens, block = 10_001, 100
    offsets = list(SequentialWindowSampler(n_tokens, block))
    assert offsets == list(range(0, 10_000, 100))
    inputs = [t for o in offsets for t in range(o, o + block)]
    assert inputs == list(range(n_tokens - 1))  # every token is an input once (the last is only a target)
    assert offsets[-1] + block + 1 <= n_tokens  # the last window's targets are in the split


def test_sequential_ranks_are_disjoint_and_equal():
    world = 3
    per_rank = [list(SequentialWindowSampler(10_001, 100, rank=r, world_size=world)) for r in range(world)]
    assert [len(r) for r in per_rank] == [33, 33, 33]  # 100 windows: one left over is dropped
    flat = [o for r in per_rank for o in r]
    assert len(set(flat)) == len(flat) == 99
    assert sorted(flat) == list(range(0, 9_900, 100))


def test_val_windows_cover_the_split_and_are_fixed():
    offsets = val_offsets(1000, 16, 10)
    assert offsets[0] == 0 and offsets[-1] == 1000 - 17 and len(offsets) == 10
    assert offsets == val_offsets(1000, 16, 10)


def test_datamodule_batches(tiny_corpus, tmp_path):
    dm = GPTDataModule(text_cfg(tiny_corpus, tmp_path, tokenizer="char", batch_size=4, val_windows=10), 32)
    dm.prepare_data()
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == y.shape == (4, 32)
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert sum(b[0].shape[0] for b in dm.val_dataloader()) == 10
    assert isinstance(dm.train_sampler, RandomWindowSampler)


def test_datamodule_sequential_with_workers_reads_the_split_in_order(tiny_corpus, tmp_path):
    cfg = text_cfg(
        tiny_corpus, tmp_path, tokenizer="char", batch_size=8, sampling="sequential", num_workers=2
    )
    dm = GPTDataModule(cfg, block_size=64)
    dm.setup("fit")
    xs = torch.cat([x for x, _ in dm.train_dataloader()])
    train = torch.from_numpy(split_tokens(dm.prepared, "train").astype(np.int64))
    n = (len(train) - 1) // 64
    assert xs.shape == (n, 64) and torch.equal(xs.flatten(), train[: n * 64])


def test_block_size_larger_than_split_is_a_clear_error(tiny_corpus, tmp_path):
    dm = GPTDataModule(text_cfg(tiny_corpus, tmp_path, tokenizer="char"), block_size=5000)
    # As soon as the data is prepared (train.py asks for the tokenizer before it builds a trainer).
    with pytest.raises(UserError, match="val split has 4000 tokens, fewer than block_size"):
        dm.tokenizer  # noqa: B018
    with pytest.raises(UserError, match="val split has 4000 tokens, fewer than block_size"):
        dm.setup("fit")


def test_corpus_shorter_than_one_window_is_a_clear_error(tmp_path):
    (tmp_path / "short.txt").write_text("To be, or not to be.")
    dm = GPTDataModule(text_cfg(tmp_path / "short.txt", tmp_path, tokenizer="char"), block_size=64)
    with pytest.raises(UserError) as excinfo:
        dm.setup("fit")
    assert "split has 18 tokens, fewer than block_size+2 = 66" in str(excinfo.value)
    assert "\n" not in str(excinfo.value)


@pytest.mark.parametrize("sampling", ["random", "sequential"])
def test_datamodule_gives_each_rank_its_own_windows(tiny_corpus, tmp_path, monkeypatch, sampling):
    cfg = text_cfg(tiny_corpus, tmp_path, tokenizer="char", batch_size=4, sampling=sampling)
    offsets = []
    for rank in range(2):
        dm = GPTDataModule(cfg, block_size=32, seed=7)
        monkeypatch.setattr(dm, "_rank_and_world", lambda rank=rank: (rank, 2))
        dm.setup("fit")
        dm.train_dataloader()
        offsets.append(list(dm.train_sampler)[:200])
    if sampling == "sequential":
        assert not set(offsets[0]) & set(offsets[1])
    else:
        assert offsets[0] != offsets[1]


@pytest.mark.parametrize(
    ("device", "devices", "cpus", "workers"),
    [("cpu", 1, 16, 0), ("cuda", 1, 16, 4), ("cuda", 8, 16, 1), ("cuda", 2, 6, 2), ("cuda", 1, 1, 1)],
)
def test_auto_num_workers_follows_the_trainers_device(
    tiny_corpus, tmp_path, monkeypatch, device, devices, cpus, workers
):
    monkeypatch.setattr(lightning_data, "_num_cpus_available", lambda: cpus)
    dm = GPTDataModule(text_cfg(tiny_corpus, tmp_path, tokenizer="char", val_windows=8), block_size=32)
    dm.trainer = fake_trainer(world=devices, max_steps=10, device=device)
    dm.setup("fit")
    assert dm.cfg.num_workers is None and dm.num_workers == workers
    loader = dm.train_dataloader()  # built, not iterated: no worker starts
    assert loader.num_workers == workers and loader.persistent_workers == (workers > 0)
    assert loader.pin_memory == (device == "cuda")
    # A number given is used as it is, on any device.
    dm.cfg.num_workers = 0
    assert dm.num_workers == 0 and dm.val_dataloader().num_workers == 0


def test_num_workers_below_zero_is_one_clear_line(tiny_corpus, tmp_path):
    with pytest.raises(ConfigError, match=r"^data.num_workers=-1 must be >= 0 \(or null: auto\)$"):
        text_cfg(tiny_corpus, tmp_path, num_workers=-1)


class RecordBatches(L.LightningModule):
    """Trains one number and keeps every input batch it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.seen: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        self.seen.append(batch[0].clone())
        return self.w * batch[0].float().mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class CheckpointAndStopAt(L.Callback):
    """Saves a checkpoint after optimizer step `step`, as ModelCheckpoint does, and stops there."""

    def __init__(self, step: int, path: Path) -> None:
        self.step, self.path = step, path

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)
            trainer.should_stop = True


@pytest.mark.parametrize("sampling", ["random", "sequential"])
def test_resume_with_workers_reading_ahead_continues_with_the_next_batch(tiny_corpus, tmp_path, sampling):
    """Two workers read batches ahead of training; the checkpoint holds the position of training."""
    cfg = text_cfg(tiny_corpus, tmp_path, tokenizer="char", batch_size=4, sampling=sampling, num_workers=2)

    ckpt = tmp_path / "step-4.ckpt"

    def fit(stop_at: int | None = None, ckpt_path: Path | None = None) -> tuple[L.Trainer, RecordBatches]:
        callbacks = [CheckpointAndStopAt(stop_at, ckpt)] if stop_at else []
        trainer = bare_trainer(tmp_path, max_steps=10, callbacks=callbacks)
        module = RecordBatches()
        trainer.fit(module, datamodule=GPTDataModule(cfg, block_size=32, seed=3), ckpt_path=ckpt_path)
        return trainer, module

    _, whole = fit()
    stopped, first = fit(stop_at=4)
    assert stopped.global_step == 4
    resumed, rest = fit(ckpt_path=ckpt)
    assert resumed.global_step == 10
    assert len(whole.seen) == 10 and len(first.seen) == 4 and len(rest.seen) == 6
    for a, b in zip(whole.seen, first.seen + rest.seen, strict=True):
        assert torch.equal(a, b)


def test_resume_with_doc_mask_continues_with_the_next_aligned_batch(tmp_path):
    """data.doc_mask: the windows move to document starts, by offset alone, so a resumed run reads
    the batches the uninterrupted one read, their positions and segments with them."""
    cfg = text_cfg(
        write_documents(tmp_path / "docs"),
        tmp_path,
        tokenizer="r50k_base",
        doc_mask=True,
        batch_size=4,
        num_workers=2,
    )
    ckpt = tmp_path / "step-4.ckpt"

    def fit(stop_at: int | None = None, ckpt_path: Path | None = None) -> RecordBatches:
        callbacks = [CheckpointAndStopAt(stop_at, ckpt)] if stop_at else []
        module = RecordBatches()
        trainer = bare_trainer(tmp_path, max_steps=10, callbacks=callbacks)
        trainer.fit(module, datamodule=GPTDataModule(cfg, block_size=32, seed=3), ckpt_path=ckpt_path)
        return module

    whole, first = fit(), fit(stop_at=4)
    rest = fit(ckpt_path=ckpt)
    assert len(whole.seen) == 10 and len(first.seen) + len(rest.seen) == 10
    for a, b in zip(whole.seen, first.seen + rest.seen, strict=True):
        assert torch.equal(a, b)
    assert any((x[:, 0] == 50_256).any() for x in whole.seen)  # aligned windows among them
