"""A tiny trained run, and serve.py started on it as a user would (forked off the warm Python of
tests/forkserver.py), bound to 127.0.0.1 on a free port, stopped after the test."""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.helpers import assert_ok, free_port, made_once, run_forked, start_forked, train_cmd, write_corpus


def train_served(work: Path) -> None:
    """50 steps of experiment=tiny (block_size 32) on the Shakespeare sample, into work/run."""
    corpus = write_corpus(work / "corpus.txt")
    assert_ok(run_forked(*train_cmd(corpus, work / "run", "trainer.max_steps=50"), cwd=work))


def train_long(work: Path) -> None:
    """A tiny model with a context of 2048 tokens and GPT-2's BPE (it encodes any text), into
    work/run: an answer of 1000 tokens streams for a second or more, time to act while it runs."""
    overrides = ["trainer.max_steps=1", "model.block_size=2048", "data.batch_size=1", "data.val_windows=1"]
    overrides += ["data.tokenizer=r50k_base", "data.val_fraction=0.25"]  # a validation window of 2049
    assert_ok(run_forked(*train_cmd(write_corpus(work / "corpus.txt"), work / "run", *overrides), cwd=work))


# Trained once per test run, whichever worker comes first: the modules here are xdist groups that
# may run on different workers.
@pytest.fixture(scope="session")
def served_run(tmp_path_factory) -> Path:
    return made_once(tmp_path_factory, "served", train_served) / "run"


@pytest.fixture(scope="session")
def long_run(tmp_path_factory) -> Path:
    return made_once(tmp_path_factory, "long", train_long) / "run"


@contextlib.contextmanager
def serving(run: Path, *overrides: str) -> Iterator[str]:
    """serve.py on `run` until the block ends: its base URL once /health answers."""
    port = free_port()
    proc = start_forked("serve.py", f"ckpt={run}", f"port={port}", *overrides, cwd=run.parent)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, f"serve.py exited {proc.returncode}:\n{proc.communicate()[1][-3000:]}"
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            assert time.monotonic() < deadline, "serve.py did not answer /health in 120 s"
            time.sleep(0.1)
        yield url
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except Exception:  # noqa: BLE001  stopped for good, whatever the way
            proc.kill()
            proc.wait()


@pytest.fixture
def server(served_run) -> Iterator[Callable[..., contextlib.AbstractContextManager[str]]]:
    """serving() on the tiny run, with overrides: `with server("api_key=k") as url: ...`."""
    yield lambda *overrides: serving(served_run, *overrides)
