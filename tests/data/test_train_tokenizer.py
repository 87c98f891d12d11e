"""data.tokenizer=train in the prepare step: the tokenizer sees the training split and nothing of the
validation split, whichever way the corpus is split; it is cached with the data, deterministic, and
reported on; bad input is one line that leaves nothing behind."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tiktoken

import gpt.data.shards
import gpt.data.train_tokenizer
from gpt.config import DataConfig
from gpt.data.encode import cut
from gpt.data.prepare import prepare
from gpt.errors import ConfigError, UserError
from gpt.tokenizer import BPETokenizer
from tests.helpers import split_tokens, text_cfg


def trained_cfg(path, tmp_path, **kw) -> DataConfig:
    return text_cfg(path, tmp_path, **({"tokenizer": "train", "vocab_size": 600} | kw))


@pytest.fixture
def seen(monkeypatch) -> list[str]:
    """The texts the BPE trainer is given, recorded as it reads them."""
    texts: list[str] = []
    real = gpt.data.train_tokenizer.train_bpe

    def recording(source, *args):
        def record():
            for text in source:
                texts.append(text)
                yield text

        return real(record(), *args)

    monkeypatch.setattr(gpt.data.train_tokenizer, "train_bpe", recording)
    return texts


def documents(prepared, split: str) -> list[str]:
    """A split's documents: its tokens decoded, cut at end-of-text."""
    tok = prepared.tokenizer()
    ids = split_tokens(prepared, split).tolist()
    return tok.decode(ids).split("<|endoftext|>") if ids else []


def write_docs(folder, docs: list[str]) -> None:
    folder.mkdir()
    for i, d in enumerate(docs):
        (folder / f"{i:03d}.txt").write_text(d, encoding="utf-8")


def test_split_by_document_the_tokenizer_reads_exactly_the_training_documents(
    tmp_path, seen, shakespeare_text
):
    lines = shakespeare_text.splitlines()
    docs = ["\n".join(lines[i : i + 40]) + "\n" for i in range(0, 4000, 40)]  # 100 documents
    write_docs(tmp_path / "docs", docs)
    prepared = prepare(trained_cfg(tmp_path / "docs", tmp_path, val_fraction=0.2), verbose=False)
    assert prepared.meta["split_by"] == "documents"
    train, val = documents(prepared, "train"), documents(prepared, "val")
    assert len(val) == 20 and sorted(train + val) == sorted(docs)
    assert seen == train  # in corpus order, each once
    assert not set(seen) & set(val)


def test_split_by_characters_the_tokenizer_reads_the_text_before_the_cut(tmp_path, seen, shakespeare_text):
    (tmp_path / "play.txt").write_text(shakespeare_text, encoding="utf-8")
    prepared = prepare(trained_cfg(tmp_path / "play.txt", tmp_path), verbose=False)
    assert prepared.meta["split_by"] == "characters"
    n = len(shakespeare_text)
    at = n - int(n * 0.1)
    assert "".join(seen) == shakespeare_text[:at] == "".join(documents(prepared, "train"))
    assert "".join(documents(prepared, "val")) == shakespeare_text[at:]


def test_few_large_documents_the_tokenizer_reads_only_what_is_train_either_way(
    tmp_path, seen, shakespeare_text, monkeypatch
):
    """Under 10 documents the splitter splits by characters, unless their tokens reach a limit (2^24;
    here 2,000): known only once tokenized. The tokenizer reads the text that is train both ways."""
    monkeypatch.setattr(gpt.data.shards, "MAX_TOKENS_TO_SPLIT_BY_CHARACTERS", 2_000)
    monkeypatch.setattr(gpt.data.train_tokenizer, "MAX_TOKENS_TO_SPLIT_BY_CHARACTERS", 2_000)
    docs = [shakespeare_text[:60_000], shakespeare_text[60_000:100_000]]
    write_docs(tmp_path / "docs", docs)
    cfg = trained_cfg(tmp_path / "docs", tmp_path, doc_chars=4096, val_fraction=0.25)
    prepared = prepare(cfg, verbose=False)
    assert prepared.meta["split_by"] == "documents"  # by part: a document's parts go both ways
    parts = [p for d in docs for p in cut([d], cfg.doc_chars)]
    text = "".join(docs)
    at = len(text) - int(len(text) * 0.25)
    val = "".join(documents(prepared, "val"))
    assert 0 < len(val) < len(text)
    for piece in seen:  # parts (or the start of the one holding the cut) that went to train
        assert piece in parts or (text.index(piece) + len(piece) == at and piece not in val)
        assert piece not in val and text.index(piece) < at
    assert len("".join(seen)) > 0.4 * len(text)


def test_when_no_part_is_drawn_for_val_the_last_training_one_is_not_read(tmp_path, seen):
    """val_fraction=0.001 of 12 documents draws none for val: the splitter then gives the last
    training document to val, so the tokenizer must not have read it."""
    docs = [f"document {i}: " + "some words here " * (20 + i) for i in range(12)]
    write_docs(tmp_path / "docs", docs)
    prepared = prepare(trained_cfg(tmp_path / "docs", tmp_path, val_fraction=0.001), verbose=False)
    assert documents(prepared, "val") == [docs[-1]]
    assert seen == docs[:-1]


def varied_docs(text: str, n: int) -> list[str]:
    return [text[i * 1500 : i * 1500 + 300 + 97 * (i % 11)] for i in range(n)]


def test_trained_data_equals_a_direct_encode_and_is_cached_by_its_settings(tmp_path, shakespeare_text):
    docs = varied_docs(shakespeare_text, 30)
    write_docs(tmp_path / "code", docs)
    cfg = trained_cfg(tmp_path / "code", tmp_path, vocab_size=400)
    prepared = prepare(cfg, verbose=False)
    tok = prepared.tokenizer()
    assert isinstance(tok, BPETokenizer) and prepared.meta["tokenizer"] == tok.to_dict()
    assert prepared.dir.name.startswith("code-bpe400-") and prepared.meta["vocab_size"] == 400
    got = sorted(documents(prepared, "train") + documents(prepared, "val"))
    assert got == sorted(docs)
    for split in ("train", "val"):
        ids = split_tokens(prepared, split).tolist()
        assert ids == [t for d in documents(prepared, split) for t in [*tok.encode(d), tok.eot_token]][:-1]
    assert not prepare(cfg, verbose=False).fresh
    others = [
        trained_cfg(tmp_path / "code", tmp_path, vocab_size=401),
        trained_cfg(tmp_path / "code", tmp_path, vocab_size=400, bpe_pattern="gpt2"),
        trained_cfg(tmp_path / "code", tmp_path, vocab_size=400, special_tokens=["<|user|>"]),
        trained_cfg(tmp_path / "code", tmp_path, vocab_size=400, split_seed=1),
    ]
    dirs = {prepared.dir} | {prepare(c, verbose=False).dir for c in others}
    assert len(dirs) == 5
    with_user = prepare(others[2], verbose=False).tokenizer()
    assert with_user.enc._special_tokens == {"<|endoftext|>": 398, "<|user|>": 399}


def test_a_checkpoints_trained_tokenizer_finds_the_data_it_was_trained_with(tmp_path, shakespeare_text):
    """evaluate task=bpb on a run's own data gives prepare the run's tokenizer: the data prepared
    when it was trained is used, not tokenized again; another tokenizer prepares anew."""
    write_docs(tmp_path / "docs", varied_docs(shakespeare_text, 20))
    cfg = trained_cfg(tmp_path / "docs", tmp_path)
    first = prepare(cfg, verbose=False)
    again = prepare(cfg, tokenizer=first.tokenizer(), verbose=False)
    assert again.dir == first.dir and not again.fresh
    other = prepare(trained_cfg(tmp_path / "docs", tmp_path, vocab_size=500), verbose=False).tokenizer()
    elsewhere = prepare(cfg, tokenizer=other, verbose=False)
    assert elsewhere.fresh and elsewhere.dir != first.dir and elsewhere.meta["tokenizer"] == other.to_dict()


def test_the_same_corpus_and_settings_give_a_byte_identical_tokenizer(tmp_path, shakespeare_text):
    (tmp_path / "play.txt").write_text(shakespeare_text[:200_000], encoding="utf-8")
    metas = [
        (prepare(trained_cfg(tmp_path / "play.txt", tmp_path / name, vocab_size=1000), verbose=False))
        for name in ("a", "b")
    ]
    a, b = ((m.dir / "meta.json").read_text() for m in metas)
    tokenizer = lambda text: json.dumps(json.loads(text)["tokenizer"])  # noqa: E731
    assert tokenizer(a) == tokenizer(b)
    for split in ("train", "val"):
        assert np.array_equal(split_tokens(metas[0], split), split_tokens(metas[1], split))


def test_compression_report_counts_the_val_split_bytes_and_tokens(tmp_path, capsys, shakespeare_text):
    write_docs(tmp_path / "code", varied_docs(shakespeare_text, 40))
    prepared = prepare(trained_cfg(tmp_path / "code", tmp_path, vocab_size=500))
    report = prepared.meta["tokenizer_training"]
    val = documents(prepared, "val")
    n_bytes = sum(len(d.encode()) for d in val)
    r50k = tiktoken.get_encoding("r50k_base")
    r50k_tokens = sum(len(r50k.encode_ordinary(d)) for d in val)
    assert report["val_bytes"] == n_bytes
    assert report["val_tokens"] == {
        "bpe500": prepared.meta["val_tokens"] - (len(val) - 1),
        "r50k_base": r50k_tokens,
    }
    assert report["bytes_per_token"]["r50k_base"] == round(n_bytes / r50k_tokens, 4)
    assert report["bytes_per_token"]["bpe500"] == round(n_bytes / report["val_tokens"]["bpe500"], 4)
    assert report["missing"] == ["cl100k_base"] or "cl100k_base" in report["bytes_per_token"]
    assert report["trained_on_bytes"] == sum(len(d.encode()) for d in documents(prepared, "train"))
    ratio = report["bytes_per_token"]["bpe500"] / report["bytes_per_token"]["r50k_base"]
    line = capsys.readouterr().out.splitlines()[0]
    assert line.startswith("trained a 500-token BPE (gpt4 pattern) on 0.0 MB of the training split in ")
    assert f"r50k_base {report['bytes_per_token']['r50k_base']:.2f}, {ratio:.2f}x" in line


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        (
            {"vocab_size": 257, "special_tokens": ["<|user|>"]},
            "data.vocab_size=257 is too small for a byte-level BPE: its 256 byte tokens and 2 special "
            "tokens take 258; use data.vocab_size=258 or more",
        ),
        (
            {"vocab_size": 100},
            "data.vocab_size=100 is too small for a byte-level BPE: its 256 byte tokens and",
        ),
        ({"bpe_pattern": "gpt3"}, "data.bpe_pattern='gpt3' is not one of gpt4, gpt2"),
        ({"special_tokens": ["<|endoftext|>"]}, "repeats a token (<|endoftext|> is always the first)"),
        ({"special_tokens": ["<|a|>", "<|a|>"]}, "repeats a token"),
        ({"special_tokens": [""]}, "must be non-empty strings"),
        ({"source": "pairs"}, "data.tokenizer=train trains a tokenizer on a text corpus"),
    ],
)
def test_bad_settings_are_one_line(tmp_path, kw, message):
    with pytest.raises(ConfigError) as excinfo:
        DataConfig(**({"source": "text", "path": "x", "tokenizer": "train"} | kw))
    assert message in str(excinfo.value) and "\n" not in str(excinfo.value)


def test_the_smallest_vocabulary_is_the_bytes_and_the_specials(tmp_path):
    (tmp_path / "a.txt").write_text("héllo wörld\n" * 500, encoding="utf-8")
    prepared = prepare(trained_cfg(tmp_path / "a.txt", tmp_path, vocab_size=257), verbose=False)
    tok = prepared.tokenizer()
    assert tok.vocab_size == 257 and tok.encode("hé") == [ord("h"), 0xC3, 0xA9]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "is empty; give it some text"),
        (b"  \n\n\t ", "is empty; give it some text"),
        ("caf\u00e9 au lait".encode("latin-1"), "is not UTF-8 text (bad byte near offset 3)"),
    ],
)
def test_bad_corpus_is_one_line_and_leaves_nothing(tmp_path, content, message):
    (tmp_path / "corpus.txt").write_bytes(content)
    with pytest.raises(UserError) as excinfo:
        prepare(trained_cfg(tmp_path / "corpus.txt", tmp_path), verbose=False)
    assert message in str(excinfo.value) and "\n" not in str(excinfo.value)
    assert not (tmp_path / "cache").exists()
