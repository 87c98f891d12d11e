"""Load a trained model for inference, without Lightning or the training config.

A checkpoint is plain data (torch.load(weights_only=True)): `hyper_parameters` holds the model
config and the tokenizer description as dicts, `state_dict` the weights under "model.". A
directory with a config.json is a Hugging Face checkpoint (GPT-2 or Llama, see gpt.hf).
"""

from __future__ import annotations

import pickle
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from gpt.config import ModelConfig, OptimConfig
from gpt.errors import UserError
from gpt.hf import is_hf_dir, load_hf_dir
from gpt.model import GPT
from gpt.tokenizer import CharTokenizer, TiktokenTokenizer, tokenizer_from_dict

# Prefixes wrappers add to parameter names: the LightningModule's attribute, torch.compile's module.
STRIP_PREFIXES = ("model.", "_orig_mod.")


def find_checkpoint(path: str | Path | None, runs_dir: str | Path = "runs") -> Path:
    """A .ckpt file or a Hugging Face checkpoint directory as given; a run dir's checkpoints/last.ckpt;
    or the newest last.ckpt under runs_dir."""
    if path is None:
        found = sorted(Path(runs_dir).glob("**/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
        if not found:
            raise UserError(
                f"no checkpoint under {runs_dir}/; train one with `python train.py` or pass ckpt=PATH"
            )
        return found[-1]
    p = Path(path)
    if is_hf_dir(p):
        return p
    if p.is_dir():
        for candidate in (p / "checkpoints" / "last.ckpt", p / "last.ckpt"):
            if candidate.is_file():
                return candidate
        raise UserError(
            f"no last.ckpt (or config.json) in {p}; pass a .ckpt file, a run dir or a Hugging Face dir"
        )
    if not p.is_file():
        raise UserError(f"checkpoint {p} does not exist; pass a .ckpt file or a run dir as ckpt=PATH")
    return p


def clean_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The network's own parameter names: strip wrapper prefixes, in this one place."""
    out = {}
    for key, value in state_dict.items():
        for prefix in STRIP_PREFIXES:
            key = key.removeprefix(prefix)
        out[key] = value
    return out


def read_checkpoint(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UserError(f"{path} holds more than plain tensors and data; refusing to load it ({e})") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise UserError(f"{path} is not a readable checkpoint ({e}); pass another ckpt=PATH") from None


def load_model(
    path: str | Path | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    runs_dir: str | Path = "runs",
) -> tuple[GPT, CharTokenizer | TiktokenTokenizer]:
    """The model (in eval mode) and tokenizer of a checkpoint; see find_checkpoint for `path`."""
    ckpt_path = find_checkpoint(path, runs_dir)
    if ckpt_path.is_dir():
        model, tokenizer = load_hf_dir(ckpt_path)
        return model.to(device=device, dtype=dtype), tokenizer
    ckpt = read_checkpoint(ckpt_path)
    try:
        hparams = ckpt["hyper_parameters"]
        config = ModelConfig(**hparams["model"])
        tokenizer = tokenizer_from_dict(hparams["tokenizer"])
        state_dict = clean_state_dict(ckpt["state_dict"])
    except (KeyError, TypeError) as e:
        raise UserError(f"{ckpt_path} is not a checkpoint of this trainer (missing {e})") from None
    model = GPT(config)
    model.load_state_dict(state_dict, strict=True)
    return model.to(device=device, dtype=dtype).eval(), tokenizer


def save_weights_checkpoint(
    model: GPT,
    tokenizer: CharTokenizer | TiktokenTokenizer,
    path: str | Path,
    optim: dict[str, Any] | None = None,
) -> Path:
    """Save a model in the plain format train.py's checkpoints have (hyper_parameters with the model,
    optim and tokenizer dicts; weights under "model."), weights only: for models made outside a
    training run (random weights for benchmarks and tests, imported weights)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    hparams = {
        "model": asdict(model.config),
        "optim": optim or asdict(OptimConfig()),
        "tokenizer": tokenizer.to_dict(),
    }
    state_dict = {f"model.{k}": v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save({"hyper_parameters": hparams, "state_dict": state_dict}, path)
    return path
