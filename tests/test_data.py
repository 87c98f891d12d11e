import json
import os

import numpy as np
import pytest
import torch

from gpt.config import DataConfig
from gpt.data import (
    SHAKESPEARE_SHA256,
    GPTDataModule,
    RandomWindowSampler,
    Windows,
    download,
    find_shakespeare,
    prepare,
    sha256_file,
    val_offsets,
)
from gpt.errors import UserError
from gpt.tokenizer import TiktokenTokenizer


def text_cfg(path, tmp_path, **kw) -> DataConfig:
    return DataConfig(source="text", path=str(path), cache_dir=str(tmp_path / "cache"), **kw)


def test_prepare_char_writes_tokens_and_meta(tiny_corpus, tmp_path):
    prepared = prepare(text_cfg(tiny_corpus, tmp_path, tokenizer="char", val_fraction=0.1))
    meta = json.loads((prepared.dir / "meta.json").read_text())
    assert meta["train_tokens"] == 36_000 and meta["val_tokens"] == 4_000
    assert meta["dtype"] == "uint16"
    tok = prepared.tokenizer()
    text = tiny_corpus.read_text()
    train, val = prepared.tokens("train"), prepared.tokens("val")
    assert tok.decode(train[:500].tolist()) == text[:500]
    assert tok.decode(val.tolist()) == text[36_000:]


def test_prepare_is_cached_and_invalidated(tiny_corpus, tmp_path):
    cfg = text_cfg(tiny_corpus, tmp_path, tokenizer="char")
    first = prepare(cfg)
    stamp = (first.dir / "train.bin").stat().st_mtime_ns
    again = prepare(cfg)
    assert again.dir == first.dir
    assert (again.dir / "train.bin").stat().st_mtime_ns == stamp  # not rewritten
    # another tokenizer or a changed source prepares anew
    assert prepare(text_cfg(tiny_corpus, tmp_path, tokenizer="r50k_base")).dir != first.dir
    tiny_corpus.write_text(tiny_corpus.read_text() + "more text\n")
    assert prepare(cfg).dir != first.dir


def test_prepare_bpe_separates_documents_with_eot(tmp_path):
    (tmp_path / "docs" / "sub").mkdir(parents=True)
    (tmp_path / "docs" / "a.txt").write_text("first document " * 50)
    (tmp_path / "docs" / "sub" / "b.md").write_text("second document " * 50)
    (tmp_path / "docs" / "skip.bin").write_bytes(b"\x00\x01")
    prepared = prepare(text_cfg(tmp_path / "docs", tmp_path, tokenizer="r50k_base", val_fraction=0.2))
    ids = np.concatenate([prepared.tokens("train"), prepared.tokens("val")]).tolist()
    tok = TiktokenTokenizer("r50k_base")
    assert ids == tok.encode("first document " * 50) + [50256] + tok.encode("second document " * 50)


def test_windows_are_shifted_by_one(tiny_corpus, tmp_path):
    prepared = prepare(text_cfg(tiny_corpus, tmp_path, tokenizer="char"))
    ds = Windows(prepared.dir / "train.bin", prepared.meta["dtype"], block_size=16)
    assert len(ds) == 36_000 - 16
    x, y = ds[100]
    tokens = torch.from_numpy(prepared.tokens("train")[100:117].astype(np.int64))
    assert x.dtype == torch.long and x.shape == (16,)
    assert torch.equal(x, tokens[:16]) and torch.equal(y, tokens[1:])


def test_sampler_is_seeded_and_resumable():
    a = list(RandomWindowSampler(1000, 200_000, seed=1))
    assert a == list(RandomWindowSampler(1000, 200_000, seed=1))
    assert a != list(RandomWindowSampler(1000, 200_000, seed=2))
    assert min(a) >= 0 and max(a) == 999 and len(a) == 200_000
    resumed = RandomWindowSampler(1000, 200_000, seed=1)
    resumed.load_state_dict({"epoch": 0, "start": 70_000})  # past a chunk boundary
    assert list(resumed) == a[70_000:]


def test_sampler_ranks_draw_different_windows():
    r0 = list(RandomWindowSampler(10_000, 100, seed=1, rank=0, world_size=2))
    r1 = list(RandomWindowSampler(10_000, 100, seed=1, rank=1, world_size=2))
    assert r0 != r1


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


def test_block_size_larger_than_split_is_a_clear_error(tiny_corpus, tmp_path):
    dm = GPTDataModule(text_cfg(tiny_corpus, tmp_path, tokenizer="char"), block_size=5000)
    with pytest.raises(UserError, match="val split has 4000 tokens, fewer than block_size"):
        dm.setup("fit")


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"", "is empty"), (b"   \n", "is empty"), (b"\xff\xfe\x00bad", "is not UTF-8 text")],
)
def test_bad_corpus_is_a_clear_error(tmp_path, content, message):
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    with pytest.raises(UserError, match=message):
        prepare(text_cfg(path, tmp_path, tokenizer="char"))


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        prepare(text_cfg(tmp_path / "nope.txt", tmp_path))


def test_shakespeare_found_in_data_root(shakespeare_text, tmp_path):
    root = os.environ["GPT_DATA_DIR"]
    assert find_shakespeare(type(tmp_path)(root)).read_text() == shakespeare_text


def test_shakespeare_offline_and_missing_says_where_to_put_it(tmp_path, monkeypatch):
    monkeypatch.setattr("gpt.data.SHAKESPEARE_URL", "http://127.0.0.1:9/unreachable")
    with pytest.raises(UserError, match="put tinyshakespeare.txt there or set GPT_DATA_DIR"):
        find_shakespeare(tmp_path / "root")


def test_download_checks_sha256(shakespeare_text, tmp_path):
    src = tmp_path / "src.txt"
    src.write_text(shakespeare_text, encoding="utf-8")
    dest = download(src.as_uri(), tmp_path / "root" / "tinyshakespeare.txt", SHAKESPEARE_SHA256)
    assert sha256_file(dest) == SHAKESPEARE_SHA256
    with pytest.raises(UserError, match="expected 0000"):
        download(src.as_uri(), tmp_path / "other.txt", "0000")
    assert not (tmp_path / "other.txt").exists()
    assert list((tmp_path).glob("*.part")) == []


def test_shakespeare_bpe_equals_direct_encode(shakespeare_text, tmp_path):
    prepared = prepare(DataConfig(source="shakespeare", tokenizer="r50k_base", cache_dir=str(tmp_path)))
    ids = np.concatenate([prepared.tokens("train"), prepared.tokens("val")])
    assert prepared.meta["vocab_size"] == 50257 and prepared.meta["dtype"] == "uint16"
    assert ids.tolist() == TiktokenTokenizer("r50k_base").encode(shakespeare_text)
    assert prepared.meta["val_tokens"] == len(ids) // 10
