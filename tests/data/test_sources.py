"""Where the corpus comes from: Tiny Shakespeare found in the data root, or downloaded and checked."""

from __future__ import annotations

import os

import pytest

from gpt.data.sources import SHAKESPEARE_FILE, SHAKESPEARE_SHA256, download, find_shakespeare, sha256_file
from gpt.errors import UserError


def test_shakespeare_found_in_data_root(shakespeare_text, tmp_path):
    root = os.environ["GPT_DATA_DIR"]
    assert find_shakespeare(type(tmp_path)(root)).read_text() == shakespeare_text


def test_shakespeare_offline_and_missing_says_where_to_put_it(tmp_path, monkeypatch):
    monkeypatch.setattr("gpt.data.sources.SHAKESPEARE_URL", "http://127.0.0.1:9/unreachable")
    with pytest.raises(UserError, match=r"put tinyshakespeare.txt \(from .*\) there or set GPT_DATA_DIR"):
        find_shakespeare(tmp_path / "root")


def test_download_checks_sha256(shakespeare_text, tmp_path):
    src = tmp_path / "src.txt"
    src.write_text(shakespeare_text, encoding="utf-8")
    dest = download(src.as_uri(), tmp_path / "root" / SHAKESPEARE_FILE, SHAKESPEARE_SHA256)
    assert sha256_file(dest) == SHAKESPEARE_SHA256
    with pytest.raises(UserError, match="expected 0000"):
        download(src.as_uri(), tmp_path / "other.txt", "0000")
    assert not (tmp_path / "other.txt").exists()
    assert list((tmp_path).glob("*.part")) == []
