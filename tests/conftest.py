"""Shared fixtures. Tests run offline: the corpus and the tiktoken cache come from ../shared."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gpt.config import ModelConfig
from gpt.model.transformer import GPT

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"

# Point the library at what ../shared provides unless the caller chose otherwise.
if (SHARED / "data" / "tinyshakespeare.txt").is_file():
    os.environ.setdefault("GPT_DATA_DIR", str(SHARED / "data"))
if (SHARED / "tiktoken-cache").is_dir():
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED / "tiktoken-cache"))
os.environ.setdefault("WANDB_MODE", "offline")

SHAKESPEARE = Path(os.environ.get("GPT_DATA_DIR", "data")) / "tinyshakespeare.txt"


def tiny_config(**overrides) -> ModelConfig:
    """The 2-layer, 32-wide model most tests need."""
    base = dict(n_layer=2, n_head=4, n_embd=32, block_size=32, vocab_size=50)
    return ModelConfig(**(base | overrides))


def tiny_model(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    return GPT(tiny_config(**overrides)).eval()


@pytest.fixture
def shakespeare_text() -> str:
    if not SHAKESPEARE.is_file():
        pytest.skip(f"{SHAKESPEARE} not found; set GPT_DATA_DIR")
    return SHAKESPEARE.read_text(encoding="utf-8")


@pytest.fixture
def tiny_corpus(tmp_path: Path, shakespeare_text: str) -> Path:
    """40k characters of Shakespeare: enough for a few training steps and a validation split."""
    path = tmp_path / "corpus.txt"
    path.write_text(shakespeare_text[:40_000], encoding="utf-8")
    return path


def run_script(
    *args: str,
    cwd: Path,
    env: dict[str, str] | None = None,
    unset: tuple[str, ...] = (),
    timeout: float = 300,
):
    """Run train.py / generate.py (or `-c code`) in a subprocess, as a user would."""
    cmd = [sys.executable, *(str(ROOT / a) if a.endswith(".py") else a for a in args)]
    full_env = os.environ | {"PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"} | (env or {})
    for name in unset:
        full_env.pop(name, None)
    return subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)
