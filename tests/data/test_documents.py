"""data.doc_mask: windows of documents (positions restarting at each end-of-text token, segments),
random windows aligned to document starts, the batches of training and validation, the refusals."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from gpt.config import DataConfig
from gpt.data.datamodule import GPTDataModule, Windows
from gpt.data.windows import document_positions, document_separator
from gpt.errors import ConfigError, UserError
from gpt.tokenizer import CharTokenizer, TiktokenTokenizer
from tests.helpers import fake_trainer, split_tokens, text_cfg, write_documents

SEP = 50_256  # r50k_base's end-of-text
BLOCK = 32


@pytest.fixture(scope="module")
def docs_cfg(tmp_path_factory) -> DataConfig:
    """40 short documents in r50k_base (3,800 tokens), with data.doc_mask."""
    tmp = tmp_path_factory.mktemp("documents")
    folder = write_documents(tmp / "docs")
    return text_cfg(folder, tmp, tokenizer="r50k_base", doc_mask=True, batch_size=4, val_windows=6)


def test_positions_restart_at_each_separator():
    x = torch.tensor([5, 9, SEP, 1, 2, SEP, SEP, 7, 8, 9])
    positions, segments = document_positions(x, SEP)
    assert positions.tolist() == [0, 1, 0, 1, 2, 0, 0, 1, 2, 3]
    assert segments.tolist() == [0, 0, 1, 1, 1, 2, 3, 3, 3, 3]
    positions, segments = document_positions(torch.tensor([SEP, 4, 4]), SEP)
    assert positions.tolist() == [0, 1, 2] and segments.tolist() == [0, 0, 0]


def stream(tmp_path: Path, starts: list[int], n: int) -> tuple[list[Path], np.ndarray]:
    """n random tokens with separators at `starts`, in shards of 100 tokens."""
    tokens = np.random.default_rng(0).integers(0, 1_000, n).astype(np.uint16)
    tokens[starts] = SEP
    paths = []
    for i, at in enumerate(range(0, n, 100)):
        paths.append(tmp_path / f"train-{i:05d}.bin")
        tokens[at : at + 100].tofile(paths[-1])
    return paths, tokens


def test_random_windows_start_at_a_document_start_when_one_is_in_them(tmp_path):
    """Short documents, long ones (over two windows), and separators near the end of the split."""
    starts = [5, 12, 40, 41, 90, 200, 203, 260, 290, 395, 398]
    paths, tokens = stream(tmp_path, starts, 400)
    ds = Windows(paths, "uint16", BLOCK, separator=SEP, align=True)
    whole = torch.from_numpy(tokens.astype(np.int64))
    covered = set()
    for i in range(len(ds)):
        x, y, positions, segments = ds[i]
        # the first separator among the inputs that can still start a window
        inside = [s for s in [0, *starts] if i <= s < min(i + BLOCK, len(ds))]
        start = inside[0] if inside else i
        assert torch.equal(x, whole[start : start + BLOCK]) and torch.equal(
            y, whole[start + 1 : start + BLOCK + 1]
        )
        assert (x[0] == SEP) == bool(inside) or i == 0
        covered.update(range(start, start + BLOCK))
    # Long documents stay covered: every token that is an input of some window still is one.
    assert covered == set(range(len(ds) + BLOCK - 1))


def test_windows_without_doc_mask_are_the_tokens_as_before(tmp_path):
    paths, tokens = stream(tmp_path, [5, 40], 400)
    whole = torch.from_numpy(tokens.astype(np.int64))
    for ds in (Windows(paths, "uint16", BLOCK), Windows(paths, "uint16", BLOCK, align=True)):
        for i in (0, 3, 99, len(ds) - 1):
            item = ds[i]
            assert len(item) == 2
            assert torch.equal(item[0], whole[i : i + BLOCK]) and torch.equal(
                item[1], whole[i + 1 : i + BLOCK + 1]
            )


def test_validation_windows_are_today_s_with_their_documents(docs_cfg):
    """Validation scores the same windows with doc_mask on and off; on, with each one's documents."""
    batches = {}
    for doc_mask in (False, True):
        dm = GPTDataModule(replace(docs_cfg, doc_mask=doc_mask), BLOCK)
        dm.trainer = fake_trainer()
        dm.setup("fit")
        batches[doc_mask] = list(dm.val_dataloader())
    assert len(batches[True]) == len(batches[False]) == 2  # 6 windows, 4 a batch
    for off, on in zip(batches[False], batches[True], strict=True):
        assert len(off) == 2 and len(on) == 4
        assert torch.equal(off[0], on[0]) and torch.equal(off[1], on[1])
        for x, positions, segments in zip(on[0], on[2], on[3], strict=True):
            expected = document_positions(x, SEP)
            assert torch.equal(positions, expected[0]) and torch.equal(segments, expected[1])


def test_training_batches_carry_positions_and_segments(docs_cfg):
    dm = GPTDataModule(docs_cfg, BLOCK, seed=1)
    dm.trainer = fake_trainer(max_steps=20)
    dm.setup("fit")
    tokens = split_tokens(dm.prepared, "train")
    seps = set(np.flatnonzero(tokens == SEP).tolist())
    n_aligned = 0
    for x, y, positions, segments in dm.train_dataloader():
        assert x.shape == y.shape == positions.shape == segments.shape == (4, BLOCK)
        assert torch.equal(positions[:, 0], torch.zeros(4, dtype=torch.long))
        assert ((positions == 0) == ((x == SEP) | (torch.arange(BLOCK) == 0))).all()
        # A window starts at a document's separator, or holds none (inside a longer document).
        assert ((x[:, 0] == SEP) | ~(x == SEP).any(dim=1)).all()
        n_aligned += int((x[:, 0] == SEP).sum())
    # 19 of the 80 windows: documents are 10 to 150 tokens long, so most windows lie inside one.
    assert len(seps) == 35 and n_aligned >= 10


def test_sequential_windows_stay_back_to_back_with_doc_mask(docs_cfg):
    dm = GPTDataModule(replace(docs_cfg, sampling="sequential"), BLOCK)
    dm.trainer = fake_trainer()
    dm.setup("fit")
    xs = torch.cat([batch[0] for batch in dm.train_dataloader()], dim=0).flatten()
    tokens = torch.from_numpy(split_tokens(dm.prepared, "train").astype(np.int64))
    assert torch.equal(xs, tokens[: len(xs)])


def test_doc_mask_is_refused_for_characters_and_pairs(tmp_path):
    with pytest.raises(
        ConfigError, match=r"^data.doc_mask=true needs an end-of-text token .* drop data.doc_mask$"
    ):
        DataConfig(doc_mask=True)  # data.tokenizer=char by default
    with pytest.raises(ConfigError, match=r"^data.doc_mask=true is for text corpora; data=pairs"):
        DataConfig(source="pairs", path="x.jsonl", tokenizer="r50k_base", doc_mask=True)
    # A corpus tokenized by characters after all (a checkpoint's tokenizer): refused at setup.
    with pytest.raises(UserError, match="tokenized by characters"):
        document_separator(CharTokenizer("abc", eot=True))
    assert document_separator(TiktokenTokenizer("r50k_base")) == SEP
