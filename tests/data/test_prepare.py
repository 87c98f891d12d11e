"""The prepare step: documents and separators, splits, shards, dtypes, the cache, errors. Finding and
downloading Tiny Shakespeare: test_sources.py; cutting text into parts: test_encode.py."""

from __future__ import annotations

import gzip
import json
import os
import sys

import numpy as np
import pytest
import tiktoken

from gpt.config import DataConfig
from gpt.data.encode import CHAR_SEPARATOR, cut
from gpt.data.prepare import fingerprint, prepare
from gpt.errors import UserError
from gpt.tokenizer import CharTokenizer, TiktokenTokenizer
from tests.helpers import run_forked, split_tokens, text_cfg


def r50k() -> TiktokenTokenizer:
    return TiktokenTokenizer("r50k_base")


def segments(ids: np.ndarray, sep: list[int]) -> list[list[int]]:
    """A token stream cut at each separator."""
    out, cur, ids, k = [], [], ids.tolist(), len(sep)
    i = 0
    while i < len(ids):
        if ids[i : i + k] == sep:
            out.append(cur)
            cur, i = [], i + k
        else:
            cur.append(ids[i])
            i += 1
    return [*out, cur]


def all_segments(prepared, sep: list[int]) -> list[list[int]]:
    return [s for split in ("train", "val") for s in segments(split_tokens(prepared, split), sep)]


# ----------------------------------------------------------------------------- documents and splits


def test_small_char_corpus_is_split_by_characters(tiny_corpus, tmp_path):
    # 40,000 characters are two parts: too few to split by document, so the last 10% of the text is val.
    prepared = prepare(text_cfg(tiny_corpus, tmp_path, tokenizer="char", val_fraction=0.1))
    meta = json.loads((prepared.dir / "meta.json").read_text())
    assert meta["split_by"] == "characters" and meta["dtype"] == "uint16"
    assert meta["train_tokens"] == 36_000 and meta["val_tokens"] == 4_000
    text = tiny_corpus.read_text()
    tok = prepared.tokenizer()
    assert tok.chars == CharTokenizer.from_text(text).chars  # "\n" is in the corpus already
    assert split_tokens(prepared, "train").tolist() == tok.encode(text[:36_000])
    assert split_tokens(prepared, "val").tolist() == tok.encode(text[36_000:])


def test_shakespeare_char_val_is_its_last_tenth(shakespeare_text, tmp_path):
    """A character model's split of Tiny Shakespeare: its last int(n * 0.1) characters (the last
    10% of its tokens, as before the split was by characters)."""
    prepared = prepare(
        DataConfig(source="shakespeare", tokenizer="char", cache_dir=str(tmp_path)), verbose=False
    )
    tok, n = prepared.tokenizer(), len(shakespeare_text)
    cut_at = n - int(n * 0.1)
    assert prepared.meta["split_by"] == "characters" and prepared.meta["val_tokens"] == int(n * 0.1)
    assert split_tokens(prepared, "train").tolist() == tok.encode(shakespeare_text[:cut_at])
    assert split_tokens(prepared, "val").tolist() == tok.encode(shakespeare_text[cut_at:])


def test_shakespeare_bpe_val_is_its_last_tenth_of_characters(shakespeare_text, tmp_path):
    """One document, split by characters as nanoGPT splits it: val is the text from character
    n - int(n * 0.1) on, whatever the tokenizer. Each side is the direct encode of its parts (cut
    at blank lines, joined without separators), the part holding the cut encoded as two pieces."""
    cfg = DataConfig(source="shakespeare", tokenizer="r50k_base", cache_dir=str(tmp_path))
    prepared = prepare(cfg)
    meta, tok = prepared.meta, r50k()
    assert meta["split_by"] == "characters" and meta["vocab_size"] == 50257 and meta["dtype"] == "uint16"
    parts = list(cut([shakespeare_text], cfg.doc_chars))
    assert meta["parts"] == len(parts) > 1 and meta["documents"] == 1
    n = len(shakespeare_text)
    cut_at = n - int(n * 0.1)
    pieces: dict[str, list[str]] = {"train": [], "val": []}
    start = 0
    for part in parts:
        end = start + len(part)
        if start < cut_at:
            pieces["train"].append(part[: cut_at - start])
        if end > cut_at:
            pieces["val"].append(part[max(cut_at - start, 0) :])
        start = end
    assert len(pieces["train"]) + len(pieces["val"]) == len(parts) + 1  # the cut is inside a part
    for split, text in (("train", shakespeare_text[:cut_at]), ("val", shakespeare_text[cut_at:])):
        ids = split_tokens(prepared, split).tolist()
        assert ids == [t for piece in pieces[split] for t in tok.encode(piece)]
        assert tok.decode(ids) == text
        assert meta[f"{split}_tokens"] == len(ids)


def test_few_documents_have_the_same_val_text_for_every_tokenizer(shakespeare_text, tmp_path):
    """Three documents, cut into parts: the last 10% of their characters (separators not counted)
    is val, the same text for characters and BPE; separators stay between documents on each side."""
    # No blank lines in the documents, so that "\n\n" in a character split is a separator.
    lines = [line for line in shakespeare_text[:20_000].splitlines() if line]
    docs = ["\n".join(lines[:200]), "\n".join(lines[200:400]), "\n".join(lines[400:420])]
    (tmp_path / "docs").mkdir()
    for i, d in enumerate(docs):
        (tmp_path / "docs" / f"{i}.txt").write_text(d)
    text = "".join(docs)
    cut_at = len(text) - int(len(text) * 0.1)
    assert len(docs[0]) < cut_at < len(docs[0]) + len(docs[1])  # the cut is in the second document
    expected = {
        "train": [docs[0], text[len(docs[0]) : cut_at]],
        "val": [text[cut_at : len(text) - len(docs[2])], docs[2]],
    }
    for name in ("char", "r50k_base"):
        prepared = prepare(
            text_cfg(tmp_path / "docs", tmp_path, tokenizer=name, doc_chars=1024), verbose=False
        )
        tok = prepared.tokenizer()
        assert prepared.meta["split_by"] == "characters" and prepared.meta["parts"] > 3
        sep = tok.encode(CHAR_SEPARATOR) if name == "char" else [tok.eot_token]
        for split in ("train", "val"):
            assert [tok.decode(s) for s in segments(split_tokens(prepared, split), sep)] == expected[split], (
                name
            )


def test_many_documents_are_split_by_document(tmp_path):
    (tmp_path / "docs").mkdir()
    for i in range(30):
        (tmp_path / "docs" / f"{i:02d}.txt").write_text(f"document number {i}. " * 20)
    prepared = prepare(text_cfg(tmp_path / "docs", tmp_path, tokenizer="r50k_base", val_fraction=0.2))
    tok = r50k()
    assert prepared.meta["split_by"] == "documents"
    val_docs = [tok.decode(seg) for seg in segments(split_tokens(prepared, "val"), [tok.eot_token])]
    assert len(val_docs) == 6 and all(d.startswith("document number") for d in val_docs)


def make_docs(root):
    """A folder of every supported format, plus files the default globs skip."""
    docs = {
        "a.txt": "the first document, plain text.\n" * 30,
        "sub/b.md": "# second\n\nMarkdown **text** " * 40,
        "sub/deeper/c.txt.gz": "third, gzipped: " * 50,
        "special.txt": "special-token text such as <|endoftext|> is ordinary text here",
    }
    rows = [f"row {i} of the jsonl file: " + "words " * (i + 5) for i in range(12)]
    gz_rows = [f"gzipped row {i}, caf\u00e9 \u2603 " * 20 for i in range(12)]
    for rel, text in docs.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if rel.endswith(".gz"):
            with gzip.open(path, "wt", encoding="utf-8") as f:
                f.write(text)
        else:
            path.write_text(text, encoding="utf-8")
    (root / "rows.jsonl").write_text(
        "".join(json.dumps({"body": r, "id": i}) + "\n" for i, r in enumerate(rows))
    )
    with gzip.open(root / "sub" / "more.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write("\n".join(json.dumps({"body": r}) for r in gz_rows) + "\n\n")
    (root / "skip.bin").write_bytes(b"\x00\x01\x02")
    (root / "drafts").mkdir()
    (root / "drafts" / "draft.txt").write_text("a draft that is excluded")
    return list(docs.values()) + rows + gz_rows


def test_folder_of_every_format_equals_direct_encode_per_document(tmp_path):
    expected = make_docs(tmp_path / "docs")
    cfg = text_cfg(
        tmp_path / "docs", tmp_path, tokenizer="r50k_base", text_field="body", exclude=["drafts/*"]
    )
    prepared = prepare(cfg, verbose=False)
    tok = r50k()
    assert prepared.meta["documents"] == len(expected) == prepared.meta["parts"]
    assert prepared.meta["split_by"] == "documents"
    got = all_segments(prepared, [tok.eot_token])
    assert sorted(got) == sorted(tok.encode(d) for d in expected)
    assert len(segments(split_tokens(prepared, "val"), [tok.eot_token])) == round(len(expected) * 0.1)


def test_include_globs_choose_the_files(tmp_path):
    make_docs(tmp_path / "docs")
    cfg = text_cfg(tmp_path / "docs", tmp_path, tokenizer="char", include=["*.md", "drafts/*"])
    prepared = prepare(cfg, verbose=False)
    tok = prepared.tokenizer()
    text = tok.decode(split_tokens(prepared, "train").tolist()) + tok.decode(
        split_tokens(prepared, "val").tolist()
    )
    assert "Markdown" in text and "a draft" in text and "plain text" not in text


def make_project(root) -> dict[str, str]:
    """A folder of source code as a project holds it; returns the files the default globs read."""
    code = {
        "main.py": "import sys\n\n\ndef main(argv):\n    return len(argv)\n",
        "pkg/util.py": 'def add(a, b):\n    """it\'s a sum"""\n    return a + b\n',
        "web/app.ts": "export const f = (x: number): number => x * 2;\n",
        "src/lib.rs": "pub fn one() -> i32 {\n    1\n}\n",
        "native/fast.c": "int one(void) { return 1; }\n",
        "Makefile": "test:\n\tpython -m pytest\n",
        "config/settings.toml": "[tool]\nname = 'x'\n",
        "README.md": "# The project\n\nIt adds numbers.\n",
    }
    ignored = {
        ".git/hooks/pre-commit.sh": "#!/bin/sh\nexit 0\n",  # hidden
        ".venv/lib/site.py": "installed = True\n",  # hidden
        "node_modules/left-pad/index.js": "module.exports = 1;\n",
        "lib/python3.11/site-packages/dep.py": "VERSION = 1\n",
        "LICENSE": "MIT\n",  # no extension
        "data.csv": "a,b\n1,2\n",  # data, not text or code
    }
    for rel, text in code.items() | ignored.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text, encoding="utf-8")
    (root / "logo.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    return code


def test_a_folder_of_code_is_read_by_default(tmp_path):
    code = make_project(tmp_path / "project")
    prepared = prepare(text_cfg(tmp_path / "project", tmp_path, tokenizer="r50k_base"), verbose=False)
    tok = r50k()
    assert prepared.meta["sources"] == prepared.meta["documents"] == len(code)
    assert prepared.meta["skipped"] == []
    # Split by characters (fewer than 10 documents): the two sides of the cut joined are the corpus.
    text = tok.decode(np.concatenate([split_tokens(prepared, s) for s in ("train", "val")]).tolist())
    docs = [code[rel] for rel in sorted(code, key=lambda rel: tmp_path / "project" / rel)]
    assert text.replace("<|endoftext|>", "") == "".join(docs)


def test_a_folders_files_that_are_not_text_are_skipped_and_counted(tmp_path, capsys):
    code = make_project(tmp_path / "project")
    (tmp_path / "project" / "old.py").write_bytes("caf\u00e9 = 1\n".encode("latin-1"))
    (tmp_path / "project" / "blob.txt").write_bytes(b"text, then a NUL\x00 byte")
    with gzip.open(tmp_path / "project" / "old.md.gz", "wb") as f:
        f.write(b"\xff\xfe not UTF-8 once decompressed")
    cfg = text_cfg(tmp_path / "project", tmp_path, tokenizer="char")
    prepared = prepare(cfg)
    assert prepared.meta["documents"] == len(code)
    skipped = [
        "blob.txt: a NUL byte at offset 16",
        "old.md.gz: not UTF-8 near offset 0",
        "old.py: not UTF-8 near offset 3",
    ]
    assert prepared.meta["skipped"] == skipped
    out, err = capsys.readouterr()
    assert (
        f"note: skipping 3 of the {len(code) + 3} files under {cfg.path} as not UTF-8 text "
        f"({skipped[0]}, ...); the prepared data's meta.json lists them"
    ) in err.splitlines()
    assert out.startswith("prepared ") and ", 3 files skipped as not UTF-8 text) in " in out
    assert "\u00e9" not in prepared.tokenizer().chars  # nothing of the skipped files was read
    # The skipped files are part of the cache key: converted to UTF-8, a file is read.
    assert not prepare(cfg, verbose=False).fresh
    (tmp_path / "project" / "old.py").write_text("caf\u00e9 = 1\n", encoding="utf-8")
    again = prepare(cfg, verbose=False)
    assert again.fresh and again.meta["documents"] == len(code) + 1 and len(again.meta["skipped"]) == 2


def test_a_folder_without_text_is_one_clear_line(tmp_path):
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "a.txt").write_bytes(b"\xff\xfe")
    with pytest.raises(UserError) as excinfo:
        prepare(text_cfg(tmp_path / "one", tmp_path), verbose=False)
    assert_one_line(
        excinfo,
        f"the one file under {tmp_path / 'one'} that data.include takes is not UTF-8 text (a.txt: not "
        "UTF-8 near offset 0); convert it to UTF-8, or choose others with data.include",
    )
    (tmp_path / "one" / "b.py").write_bytes(b"\x00")
    with pytest.raises(UserError) as excinfo:
        prepare(text_cfg(tmp_path / "one", tmp_path), verbose=False)
    assert_one_line(excinfo, "none of the 2 files under ")
    assert "is UTF-8 text (a.txt: not UTF-8 near offset 0, ...); convert them" in str(excinfo.value)


def test_no_files_to_read_says_which_globs_would_read_them(tmp_path):
    folder = tmp_path / "sas"
    for rel in ("a.sas", "b.sas", "sub/c.sas", "notes.lst", "old/data.dat.gz", ".hidden.xyz"):
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(gzip.compress(b"data x;\n") if rel.endswith(".gz") else b"data x;\n")
    with pytest.raises(UserError) as excinfo:
        prepare(text_cfg(folder, tmp_path), verbose=False)
    assert_one_line(
        excinfo,
        f"no files under {folder} match data.include (the default: common text and source-code "
        "extensions, listed in docs/data.md); it holds *.sas (3 files), *.dat.gz (1 file), *.lst (1 "
        "file): to read them, 'data.include=[*.sas,*.dat.gz,*.lst]'",
    )
    # The override it prints, as Hydra reads it, reads them.
    from hydra.core.override_parser.overrides_parser import OverridesParser

    override = str(excinfo.value).rsplit(" '", 1)[1].rstrip("'")
    globs = OverridesParser.create().parse_overrides([override])[0].value()
    prepared = prepare(text_cfg(folder, tmp_path, tokenizer="char", include=globs), verbose=False)
    assert prepared.meta["documents"] == 5
    with pytest.raises(UserError) as excinfo:
        prepare(text_cfg(folder, tmp_path, include=["*.sas"], exclude=["*.sas"]), verbose=False)
    assert_one_line(
        excinfo, f"every file that data.include takes under {folder} is left out by data.exclude=['*.sas']"
    )
    with pytest.raises(UserError) as excinfo:
        prepare(text_cfg(folder, tmp_path, include=["*.txt"]), verbose=False)
    assert_one_line(excinfo, "match data.include=['*.txt']; it holds *.sas (3 files),")


def test_char_documents_are_separated_by_a_blank_line(tmp_path):
    docs = [f"document number {i}" for i in range(12)]
    for i, d in enumerate(docs):
        (tmp_path / "docs").mkdir(exist_ok=True)
        (tmp_path / "docs" / f"{i:02d}.txt").write_text(d)
    prepared = prepare(text_cfg(tmp_path / "docs", tmp_path, tokenizer="char"), verbose=False)
    tok = prepared.tokenizer()
    assert "\n" in tok.chars  # the separator's character is always in the vocabulary
    got = all_segments(prepared, tok.encode(CHAR_SEPARATOR))
    assert sorted(tok.decode(s) for s in got) == sorted(docs)


def test_char_vocabulary_is_saved_and_names_an_unknown_character(tiny_corpus, tmp_path):
    prepared = prepare(text_cfg(tiny_corpus, tmp_path, tokenizer="char"), verbose=False)
    saved = json.loads((prepared.dir / "meta.json").read_text())["tokenizer"]
    assert saved == {"kind": "char", "chars": "".join(sorted(set(tiny_corpus.read_text())))}
    with pytest.raises(UserError) as excinfo:
        prepared.tokenizer().encode("ROMEO: \u00a7")
    assert_one_line(excinfo, "character '\u00a7' (U+00A7) is not in this model's")


def test_a_given_character_vocabulary_tokenizes_the_corpus(tiny_corpus, tmp_path):
    """A model being fine-tuned keeps its ids: the corpus is tokenized with its vocabulary (in any
    order), which is part of the cache fingerprint."""
    text = tiny_corpus.read_text()
    own = prepare(text_cfg(tiny_corpus, tmp_path, tokenizer="char"), verbose=False)
    wider = CharTokenizer("".join(sorted(set(text) | set("\u00a7\u00e9"))))
    scrambled = CharTokenizer(wider.chars[::-1], eot=True)
    dirs = {own.dir}
    for tok in (wider, scrambled):
        prepared = prepare(text_cfg(tiny_corpus, tmp_path, tokenizer="char"), tokenizer=tok, verbose=False)
        assert prepared.meta["tokenizer"] == tok.to_dict()
        ids = np.concatenate([split_tokens(prepared, "train"), split_tokens(prepared, "val")])
        assert ids.tolist() == tok.encode(text)  # one document: no separator
        dirs.add(prepared.dir)
    assert len(dirs) == 3


def test_a_character_outside_a_given_vocabulary_is_one_line_naming_it_and_its_file(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("plain text\n")
    (tmp_path / "docs" / "b.txt").write_text("plain caf\u00e9\n")
    tok = CharTokenizer("\n acefilnptx")
    with pytest.raises(UserError) as excinfo:
        prepare(text_cfg(tmp_path / "docs", tmp_path), tokenizer=tok, verbose=False)
    assert_one_line(
        excinfo,
        f"{tmp_path / 'docs' / 'b.txt'} holds '\u00e9' (U+00E9), a character not in the checkpoint's "
        "12-character vocabulary (the model fine-tuned or evaluated); remove or replace it in the corpus, "
        "or leave the file out with data.exclude",
    )
    assert not list((tmp_path / "cache").glob("*"))  # nothing written


def test_split_depends_on_the_seed_and_keeps_both_splits_nonempty(tmp_path):
    (tmp_path / "docs").mkdir()
    for i in range(40):
        (tmp_path / "docs" / f"{i:02d}.txt").write_text(f"document {i} " * 20)
    tok = r50k()

    def val_docs(**kw):
        prepared = prepare(text_cfg(tmp_path / "docs", tmp_path, tokenizer="r50k_base", **kw), verbose=False)
        assert prepared.meta["train_tokens"] > 0 and prepared.meta["val_tokens"] > 0
        return sorted(tok.decode(s) for s in segments(split_tokens(prepared, "val"), [tok.eot_token]))

    assert len(val_docs()) == 4 and val_docs() == val_docs()
    assert val_docs(split_seed=1) != val_docs()
    assert len(val_docs(val_fraction=0.5)) == 20
    assert len(val_docs(val_fraction=0.01)) == 1  # 0.4 documents expected: still one


# ----------------------------------------------------------------------------- shards and dtypes


def test_shards_hold_the_stream_in_order(shakespeare_text, tmp_path):
    one = prepare(DataConfig(tokenizer="char", cache_dir=str(tmp_path / "a")), verbose=False)
    many = prepare(
        DataConfig(tokenizer="char", cache_dir=str(tmp_path / "b"), shard_tokens=100_000), verbose=False
    )
    shards = many.meta["shards"]["train"]
    assert len(shards) == -(-many.meta["train_tokens"] // 100_000)
    assert all(s["tokens"] == 100_000 for s in shards[:-1])
    assert [os.path.getsize(p) // 2 for p in many.shard_paths("train")] == [s["tokens"] for s in shards]
    assert np.array_equal(split_tokens(many, "train"), split_tokens(one, "train"))
    assert np.array_equal(split_tokens(many, "val"), split_tokens(one, "val"))


def big_encoding() -> tuple[tiktoken.Encoding, list[str]]:
    """r50k_base plus 15,500 merges and end-of-text: 65,757 tokens, so ids need uint32.

    The new merges join, step by step, the r50k tokens of made-up words into one token each. BPE
    applies them after all of r50k's own merges, so the new ids really occur in encoded text.
    """
    base = tiktoken.get_encoding("r50k_base")
    ranks = dict(base._mergeable_ranks)
    words = []
    letters = "bcdfghjklmnprstvwxyz"
    i = 0
    while len(ranks) < 50_256 + 15_500:
        word = " " + "".join(letters[(i // 20**k) % 20] for k in range(5)) + "ia"
        pieces = [base.decode_single_token_bytes(t) for t in base.encode_ordinary(word)]
        for k in range(1, len(pieces)):
            ranks.setdefault(b"".join(pieces[: k + 1]), len(ranks))
        words.append(word.strip())
        i += 1
    enc = tiktoken.Encoding(
        name="r50k_plus",
        pat_str=base._pat_str,
        mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": len(ranks)},
    )
    return enc, words


class EncodingTokenizer(TiktokenTokenizer):
    """A tiktoken Encoding built in code, which TiktokenTokenizer(name) cannot load."""

    def __init__(self, enc: tiktoken.Encoding) -> None:
        self.name, self.enc, self.vocab_size, self.eot_token = enc.name, enc, enc.n_vocab, enc.eot_token


def test_vocabulary_beyond_uint16_is_stored_as_uint32(tmp_path):
    enc, words = big_encoding()
    tok = EncodingTokenizer(enc)
    assert tok.vocab_size > 65_536
    (tmp_path / "docs").mkdir()
    docs = [" ".join(words[-300 * (i + 1) : -300 * i or None]) for i in range(12)]
    for i, d in enumerate(docs):
        (tmp_path / "docs" / f"{i:02d}.txt").write_text(d)
    prepared = prepare(text_cfg(tmp_path / "docs", tmp_path, tokenizer="r50k_base"), tokenizer=tok)
    assert prepared.meta["dtype"] == "uint32" and prepared.meta["vocab_size"] == tok.vocab_size
    assert os.path.getsize(prepared.shard_paths("train")[0]) == 4 * prepared.meta["train_tokens"]
    got = all_segments(prepared, [tok.eot_token])
    assert max(max(s) for s in got) > 65_535
    assert sorted(got) == sorted(enc.encode_ordinary(d) for d in docs)


# ----------------------------------------------------------------------------- the cache


def test_prepare_is_cached_and_invalidated(tiny_corpus, tmp_path):
    cfg = text_cfg(tiny_corpus, tmp_path, tokenizer="char")
    first = prepare(cfg)
    assert first.fresh
    stamp = first.shard_paths("train")[0].stat().st_mtime_ns
    again = prepare(cfg)
    assert again.dir == first.dir and not again.fresh
    assert again.shard_paths("train")[0].stat().st_mtime_ns == stamp  # not rewritten
    # another tokenizer, another split or a changed source prepares anew
    assert prepare(text_cfg(tiny_corpus, tmp_path, tokenizer="r50k_base")).dir != first.dir
    assert prepare(text_cfg(tiny_corpus, tmp_path, tokenizer="char", val_fraction=0.2)).dir != first.dir
    assert prepare(text_cfg(tiny_corpus, tmp_path, tokenizer="char", split_seed=3)).dir != first.dir
    tiny_corpus.write_text(tiny_corpus.read_text() + "more text\n")
    changed = prepare(cfg)
    assert changed.dir != first.dir and changed.fresh
    assert changed.meta["train_tokens"] == first.meta["train_tokens"] + 9


def test_cache_key_of_tiny_shakespeare_and_of_a_file_ignores_the_default_globs(tiny_corpus, tmp_path):
    """Globs choose a folder's files only: Tiny Shakespeare and a single file (text or pairs) keep
    the key they had before the default globs took source code; a folder's key follows its globs."""
    old_include = ["*.txt", "*.md", "*.jsonl", "*.txt.gz", "*.md.gz", "*.jsonl.gz"]
    pairs_include = ["*.jsonl", "*.jsonl.gz"]
    (tmp_path / "docs").mkdir()
    folder_file = tmp_path / "docs" / "a.txt"
    folder_file.write_text("some text\n")
    cases = [  # (config now, the same config before, its files, whether the keys agree)
        (DataConfig(source="shakespeare"), DataConfig(include=old_include, exclude=[]), tiny_corpus, True),
        (
            text_cfg(tiny_corpus, tmp_path),
            text_cfg(tiny_corpus, tmp_path, include=old_include, exclude=[]),
            tiny_corpus,
            True,
        ),
        (
            DataConfig(source="pairs", path=str(tiny_corpus), include=pairs_include),
            DataConfig(source="pairs", path=str(tiny_corpus), include=pairs_include, exclude=[]),
            tiny_corpus,
            True,
        ),
        (
            text_cfg(tmp_path / "docs", tmp_path),
            text_cfg(tmp_path / "docs", tmp_path, include=old_include, exclude=[]),
            folder_file,
            False,
        ),
    ]
    for now, before, file, same in cases:
        key = {"kind": "char"}
        assert (fingerprint(now, [file], key) == fingerprint(before, [file], key)) == same, now


def test_interrupted_prepare_leaves_nothing_a_later_run_trusts(tmp_path, monkeypatch):
    (tmp_path / "docs").mkdir()
    for i in range(30):
        (tmp_path / "docs" / f"{i:02d}.txt").write_text(f"document {i} " * 500)
    cfg = text_cfg(tmp_path / "docs", tmp_path, tokenizer="r50k_base", shard_tokens=1024)
    real_write = __import__("gpt.data.shards").data.shards.ShardWriter.write
    calls = []

    def dying_write(self, ids):
        calls.append(1)
        if len(calls) == 20:  # several shards are on disk by now
            raise KeyboardInterrupt
        real_write(self, ids)

    monkeypatch.setattr("gpt.data.shards.ShardWriter.write", dying_write)
    with pytest.raises(KeyboardInterrupt):
        prepare(cfg, verbose=False)
    assert list((tmp_path / "cache").iterdir()) == []  # the temporary folder went with it
    # a process killed outright leaves its temporary folder: it is never read
    (tmp_path / "cache" / "docs-r50k_base-0123456789abcdef.tmp-xyz").mkdir()
    (tmp_path / "cache" / "docs-r50k_base-0123456789abcdef.tmp-xyz" / "train-00000.bin").write_bytes(b"\0\0")
    monkeypatch.setattr("gpt.data.shards.ShardWriter.write", real_write)
    prepared = prepare(cfg, verbose=False)
    assert prepared.fresh and ".tmp-" not in prepared.dir.name
    assert sorted(all_segments(prepared, [50256])) == sorted(
        r50k().encode(f"document {i} " * 500) for i in range(30)
    )


# ----------------------------------------------------------------------------- one-line errors


def assert_one_line(excinfo, message: str) -> None:
    assert message in str(excinfo.value)
    assert "\n" not in str(excinfo.value)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.txt", b"", "is empty"),
        ("blank.txt", b"   \n\n", "is empty"),
        (
            "latin1.txt",
            "caf\u00e9 cr\u00e8me".encode("latin-1"),
            "is not UTF-8 text (bad byte near offset 3)",
        ),
        ("binary.txt", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "is not UTF-8 text"),
        ("nul.txt", b"text with a NUL\x00 byte", "looks binary (it holds NUL bytes)"),
        ("bad.jsonl", b'{"text": "fine"}\n{"text": broken\n', "bad.jsonl:2 is not JSON"),
        ("field.jsonl", b'{"body": "no text field"}\n', "field.jsonl:1 has no string field 'text'"),
        ("bad.txt.gz", b"not gzip at all", "is not a readable gzip file"),
    ],
)
@pytest.mark.parametrize("tokenizer", ["char", "r50k_base"])
def test_bad_corpus_is_one_clear_line(tmp_path, name, content, message, tokenizer):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(UserError) as excinfo:
        prepare(text_cfg(path, tmp_path, tokenizer=tokenizer), verbose=False)
    assert_one_line(excinfo, message)
    assert not (tmp_path / "cache").exists() or list((tmp_path / "cache").iterdir()) == []


def test_missing_path_and_empty_folder_are_one_clear_line(tmp_path):
    with pytest.raises(UserError) as excinfo:
        prepare(text_cfg(tmp_path / "nope.txt", tmp_path))
    assert_one_line(excinfo, "does not exist")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "image.png").write_bytes(b"\x89PNG")
    with pytest.raises(UserError) as excinfo:
        prepare(text_cfg(tmp_path / "empty", tmp_path))
    assert_one_line(excinfo, "no files under")


# ----------------------------------------------------------------------------- the command line


def test_command_line_prepares_once_then_hits_the_cache(tiny_corpus, tmp_path):
    args = ["prepare.py", "data=text", f"data.path={tiny_corpus}", "data.tokenizer=char"]
    args.append(f"data.cache_dir={tmp_path / 'cache'}")
    first = run_forked(*args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip().splitlines()[-1].startswith("prepared ")
    assert "36,000 train and 4,000 val tokens (uint16, 2 shards)" in first.stdout
    second = run_forked(*args, cwd=tmp_path)
    assert second.returncode == 0 and second.stdout.startswith("cached ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "corpus.txt"]  # no run folder, no log file


def test_command_line_expands_a_quoted_tilde(tiny_corpus, tmp_path):
    """Hydra reads `~` only in quotes, and no shell expands it after `data.path=`: the config does."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    args = ["prepare.py", "data=text", 'data.path="~/corpus.txt"', "data.tokenizer=char"]
    proc = run_forked(*args, 'data.cache_dir="~/cache"', cwd=elsewhere, env={"HOME": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    assert f"prepared {tmp_path / 'cache'}" in proc.stdout
    assert list(elsewhere.iterdir()) == []  # no folder named ~


def test_command_line_error_is_one_line(tmp_path):
    proc = run_forked("prepare.py", "data=text", f"data.path={tmp_path / 'nope'}", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: data.path ") and proc.stderr.endswith(
        " does not exist; pass a text file or a folder of text files\n"
    )
    assert proc.stderr.count("\n") == 1


# ----------------------------------------------------------------------------- Hugging Face datasets


def test_hf_dataset_saved_to_disk(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [f"story number {i}: " + "once upon a time " * (i + 1) for i in range(15)]
    pyarrow = pytest.importorskip("pyarrow")
    # Built from an Arrow table with a given fingerprint: from_dict hashes its input with dill, which
    # fails with some pyarrow versions, and that is not what this test is about.
    table = pyarrow.table({"story": rows, "n": list(range(15))})
    datasets.Dataset(table, fingerprint="test").save_to_disk(str(tmp_path / "ds"))
    cfg = DataConfig(
        source="hf",
        path=str(tmp_path / "ds"),
        text_field="story",
        tokenizer="r50k_base",
        cache_dir=str(tmp_path),
    )
    prepared = prepare(cfg, verbose=False)
    tok = r50k()
    assert prepared.meta["documents"] == 15
    assert sorted(all_segments(prepared, [tok.eot_token])) == sorted(tok.encode(r) for r in rows)
    assert not prepare(cfg, verbose=False).fresh


def test_hf_without_datasets_is_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets now fails
    cfg = DataConfig(source="hf", path="some/dataset", tokenizer="r50k_base", cache_dir=str(tmp_path))
    with pytest.raises(UserError) as excinfo:
        prepare(cfg, verbose=False)
    assert_one_line(excinfo, "data=hf needs the Hugging Face datasets package: pip install datasets")
