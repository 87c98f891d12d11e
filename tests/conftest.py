"""Shared fixtures; shared plain functions and constants are in tests/helpers.py. Tests run offline:
the corpus and the tiktoken cache come from ../shared (helpers.py points the library at them)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests.helpers import SHAKESPEARE, write_corpus


def pytest_configure(config: pytest.Config) -> None:
    """In an xdist worker: the CPUs shared out between the workers, for torch here and in every
    process a test starts (OMP_NUM_THREADS), unless set already. Two workers each running OpenMP
    threads on every core make a tiny training run up to ten times slower: the threads of one wait,
    spinning, for the threads the other holds."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        threads = max(len(os.sched_getaffinity(0)) // workers, 1)
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """-n auto (pyproject.toml's addopts): one worker per CPU this process may use, at least 2 (a test
    spends part of its time waiting on the processes it starts), at most 8 (each worker keeps a
    warm Python of about 1 GB, tests/forkserver.py)."""
    return min(max(len(os.sched_getaffinity(0)), 2), 8)


@pytest.fixture
def shakespeare_text() -> str:
    if not SHAKESPEARE.is_file():
        pytest.skip(f"{SHAKESPEARE} not found; set GPT_DATA_DIR")
    return SHAKESPEARE.read_text(encoding="utf-8")


@pytest.fixture
def tiny_corpus(tmp_path: Path) -> Path:
    """40k characters of Shakespeare: enough for a few training steps and a validation split."""
    return write_corpus(tmp_path / "corpus.txt")
