"""Shared fixtures; shared plain functions and constants are in tests/helpers.py. Tests run offline:
the corpus and the tiktoken cache come from ../shared (helpers.py points the library at them)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from tests.helpers import (
    BASE,
    DDP_COMMON,
    DDP_ONLY,
    SHAKESPEARE,
    assert_ok,
    made_once,
    run_forked,
    write_corpus,
)


def cpus() -> int:
    """The CPUs this process may use (all of them where the OS cannot say, as on macOS)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def pytest_configure(config: pytest.Config) -> None:
    """In an xdist worker: the CPUs shared out between the workers, for torch here and in every
    process a test starts (OMP_NUM_THREADS), unless set already. With two workers each running OpenMP
    threads on both cores of a 2-core machine, a fault test that takes 2.5 s alone took 22 s: the
    threads of one spin, waiting, on the cores the other holds."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        threads = max(cpus() // workers, 1)
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """-n auto (pyproject.toml's addopts): one worker per CPU this process may use, at least 2 (a test
    spends part of its time waiting on the processes it starts), at most 8 (each worker keeps,
    beside itself, a warm Python of 0.4 GB: tests/forkserver.py)."""
    return min(max(cpus(), 2), 8)


@pytest.fixture
def shakespeare_text() -> str:
    if not SHAKESPEARE.is_file():
        pytest.skip(f"{SHAKESPEARE} not found; set GPT_DATA_DIR")
    return SHAKESPEARE.read_text(encoding="utf-8")


@pytest.fixture
def tiny_corpus(tmp_path: Path) -> Path:
    """40k characters of Shakespeare: enough for a few training steps and a validation split."""
    return write_corpus(tmp_path / "corpus.txt")


@pytest.fixture(scope="session")
def ddp_run(tmp_path_factory) -> Path:
    """train.py on two CPU processes (strategy=ddp), BASE for 10 steps on tiny_corpus's text, in the
    default run dir (runs/<date>/<time>) of the folder returned: made once for the whole test run
    (tests/commands/test_train.py compares it with one process, test_e2e.py checks its run dir)."""

    def make(folder: Path) -> None:
        shutil.rmtree(folder / "runs", ignore_errors=True)  # what a failed try left
        corpus = write_corpus(folder / "corpus.txt")
        args = ["train.py", *BASE, f"data.path={corpus}", *DDP_COMMON, *DDP_ONLY]
        assert_ok(run_forked(*args, cwd=folder, timeout=600))

    return made_once(tmp_path_factory, "ddp", make)
