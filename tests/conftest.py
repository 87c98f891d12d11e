"""Shared fixtures; shared plain functions and constants are in tests/helpers.py. Tests run offline:
the corpus and the tiktoken cache come from ../shared (helpers.py points the library at them)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import SHAKESPEARE, write_corpus


@pytest.fixture
def shakespeare_text() -> str:
    if not SHAKESPEARE.is_file():
        pytest.skip(f"{SHAKESPEARE} not found; set GPT_DATA_DIR")
    return SHAKESPEARE.read_text(encoding="utf-8")


@pytest.fixture
def tiny_corpus(tmp_path: Path) -> Path:
    """40k characters of Shakespeare: enough for a few training steps and a validation split."""
    return write_corpus(tmp_path / "corpus.txt")
