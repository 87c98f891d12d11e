"""Checkpoints of a run: find them, open them, check them against a config, describe them, and load a
trained model for inference without Lightning or the training config.

A checkpoint is plain data (torch.load(weights_only=True)): `hyper_parameters` holds the model
config and the tokenizer description as dicts, `state_dict` the weights under "model.". A
directory with a config.json is a Hugging Face checkpoint (GPT-2 or Llama, see gpt.interop).
"""

from __future__ import annotations

import pickle
import warnings
import zipfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from gpt.config import ModelConfig, OptimConfig
from gpt.errors import UserError
from gpt.interop.hf import is_hf_dir
from gpt.interop.load import load_hf_dir
from gpt.model.transformer import GPT
from gpt.tokenizer import CharTokenizer, TiktokenTokenizer, tokenizer_from_dict


def checkpoints_newest_first(run_dir: str | Path) -> list[Path]:
    """A run's checkpoints, most recently written first: checkpoints/*.ckpt, and the
    hpc_ckpt_N.ckpt Lightning writes into the run dir when SLURM signals a requeue."""
    run_dir = Path(run_dir)
    found = [*run_dir.glob("checkpoints/*.ckpt"), *run_dir.glob("hpc_ckpt_*.ckpt")]
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


def newest_checkpoint(run_dir: str | Path) -> Path | None:
    found = checkpoints_newest_first(run_dir)
    return found[0] if found else None


def readable(path: Path) -> str | None:
    """Why a checkpoint cannot be resumed from, or None. Memory-mapped, so tensors are not read:
    a truncated file fails on its missing zip directory, a pickled payload on weights_only."""
    if not zipfile.is_zipfile(path):
        return "not the zip archive torch.save writes: truncated, or another kind of file"
    try:
        torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # truncated zips, foreign pickles and bad headers raise many types
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return None


def newest_readable_checkpoint(run_dir: str | Path, warn: bool = False) -> Path | None:
    """The newest checkpoint that can be resumed from; unreadable newer ones are passed over
    (with a warning each if `warn`)."""
    for path in checkpoints_newest_first(run_dir):
        problem = readable(path)
        if problem is None:
            return path
        if warn:
            warnings.warn(f"skipping unreadable checkpoint {path} ({problem})", stacklevel=3)
    return None


# Prefixes wrappers add to parameter names: the LightningModule's attribute, torch.compile's module.
STRIP_PREFIXES = ("model.", "_orig_mod.")


def find_checkpoint(path: str | Path | None, runs_dir: str | Path = "runs") -> Path:
    """A .ckpt file or a Hugging Face checkpoint directory as given; a run dir's checkpoints/last.ckpt;
    or the newest last.ckpt under runs_dir."""
    if path is None:
        found = sorted(
            Path(runs_dir).expanduser().glob("**/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime
        )
        if not found:
            raise UserError(
                f"no checkpoint under {runs_dir}/; train one with `python train.py` or pass ckpt=PATH"
            )
        return found[-1]
    p = Path(path).expanduser()
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


def describe_checkpoint(path: Path) -> str:
    """The file and its training step, as generate and export name what they load:
    `runs/x/checkpoints/last.ckpt (step 300)`. Reads only the checkpoint's pickle (mmap)."""
    if path.is_dir():
        return f"{path} (Hugging Face)"
    step = read_checkpoint(path, mmap=True).get("global_step")
    return f"{path} (step {step})" if isinstance(step, int) else f"{path} (weights only, no training step)"


def clean_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The network's own parameter names: strip wrapper prefixes, in this one place."""
    out = {}
    for key, value in state_dict.items():
        for prefix in STRIP_PREFIXES:
            key = key.removeprefix(prefix)
        out[key] = value
    return out


def read_checkpoint(path: Path, mmap: bool = False) -> dict[str, Any]:
    """The checkpoint's plain data; mmap=True leaves the tensors on disk until they are read."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # a damaged or foreign file makes torch.load raise many types (KeyError too)
        # torch.save writes a zip archive: anything else is truncated or another kind of file, and
        # torch's own message for it ("Weights only load failed...", "Invalid argument") misleads.
        if not zipfile.is_zipfile(path):
            raise UserError(
                f"{path} is not a checkpoint (not the zip archive torch.save writes: truncated, or "
                "another kind of file); pass another ckpt=PATH"
            ) from None
        if isinstance(e, pickle.UnpicklingError):
            raise UserError(
                f"{path} holds Python objects besides tensors and plain data, which are not loaded "
                "(weights_only); pass a checkpoint written by train.py"
            ) from None
        raise UserError(
            f"{path} is not a readable checkpoint ({_first_line(e)}); pass another ckpt=PATH"
        ) from None
    if not isinstance(ckpt, dict):
        raise UserError(
            f"{path} is not a checkpoint of this trainer (it holds a {type(ckpt).__name__}); "
            "pass another ckpt=PATH"
        )
    return ckpt


def _first_line(e: BaseException, limit: int = 200) -> str:
    """The message's first line, with the next one when it ends in ':' (torch's "Error(s) in ...:"),
    cut to `limit` characters (a list of missing weights can be long)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    if not lines:
        return type(e).__name__
    line = f"{lines[0]} {lines[1]}" if lines[0].endswith(":") and len(lines) > 1 else lines[0]
    line = line.rstrip(".")
    return line if len(line) <= limit else line[: limit - 3] + "..."


def describe_tokenizer(d: dict[str, Any]) -> str:
    if d.get("kind") == "char":
        return f"a {len(d.get('chars', ''))}-character vocabulary"
    return f"tokenizer {d.get('name', d)!r}"


def check_vocabulary(path: Path, config: ModelConfig, tokenizer: CharTokenizer | TiktokenTokenizer) -> None:
    """A tokenizer with ids past the model's embedding is not the one the model was trained with."""
    if config.vocab_size is not None and tokenizer.vocab_size > config.vocab_size:
        raise UserError(
            f"{path}: its tokenizer has {tokenizer.vocab_size} tokens but its model only "
            f"vocab_size={config.vocab_size}, so the tokenizer saved with it is not the one it was "
            "trained with; pass another ckpt=PATH"
        )


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
        check_vocabulary(ckpt_path, model.config, tokenizer)
        return model.to(device=device, dtype=dtype), tokenizer
    ckpt = read_checkpoint(ckpt_path)
    try:
        hparams = ckpt["hyper_parameters"]
        config = ModelConfig(**hparams["model"])
        tokenizer = tokenizer_from_dict(hparams["tokenizer"])
        state_dict = clean_state_dict(ckpt["state_dict"])
    except (KeyError, TypeError) as e:
        raise UserError(f"{ckpt_path} is not a checkpoint of this trainer (missing {e})") from None
    check_vocabulary(ckpt_path, config, tokenizer)
    model = GPT(config)
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:  # missing, unexpected or mis-shaped weights
        raise UserError(
            f"{ckpt_path}: its weights do not match its model config ({_first_line(e)}); the file was "
            "edited or damaged, pass another ckpt=PATH"
        ) from None
    return model.to(device=device, dtype=dtype).eval(), tokenizer


# The ModelConfig fields named when a checkpoint's weights do not fit this run's model.
ARCHITECTURE = (
    "n_layer", "n_head", "n_embd", "block_size", "vocab_size", "pos_emb", "norm", "ffn", "ffn_hidden",
    "bias", "tie_embeddings",
)  # fmt: skip


def check_resumable(path: str | Path, config: ModelConfig, tokenizer: dict[str, Any]) -> None:
    """Refuse, in one line, a checkpoint that a run with this model and tokenizer cannot continue:
    Lightning would fail deep inside its load with a traceback or, for another vocabulary of the
    same size, go on training with every token's meaning changed."""
    ckpt = read_checkpoint(Path(path), mmap=True)  # shapes only: the weights stay on disk
    if not isinstance(ckpt.get("state_dict"), dict):
        raise UserError(f"{path} is not a checkpoint of this trainer (it has no state_dict); pass another")
    hparams = ckpt.get("hyper_parameters") or {}
    saved_tokenizer = hparams.get("tokenizer")
    if saved_tokenizer is not None and saved_tokenizer != tokenizer:
        raise UserError(
            f"{path} was trained with {describe_tokenizer(saved_tokenizer)} but this run's data.tokenizer "
            f"gives {describe_tokenizer(tokenizer)}; resume with the data settings it was trained with, "
            "or start a new run dir (hydra.run.dir=...)"
        )
    with torch.device("meta"):
        ours = {k: tuple(v.shape) for k, v in GPT(config).state_dict().items()}
    weights = {k: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    saved = {k: tuple(v.shape) for k, v in clean_state_dict(weights).items()}
    if ours == saved:
        return
    saved_model = hparams.get("model") or {}
    diffs = [
        f"model.{name}={saved_model[name]} in it, {getattr(config, name)} now"
        for name in ARCHITECTURE
        if name in saved_model and saved_model[name] != getattr(config, name)
    ]
    if not diffs:
        key = next(k for k in sorted(ours.keys() | saved.keys()) if ours.get(k) != saved.get(k))
        diffs = [f"weight {key} is {saved.get(key)} in it, {ours.get(key)} now"]
    raise UserError(
        f"{path} holds a model of another shape ({'; '.join(diffs)}); resume with the model settings "
        "it was trained with, or start a new run dir (hydra.run.dir=...)"
    )


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
