"""Checkpoints, in one place: find, open, check and describe them; load a model without Lightning.

A checkpoint is plain data (torch.load(weights_only=True)): `hyper_parameters` holds the model
config and the tokenizer description as dicts (for a model trained on prompt -> completion pairs,
its `data_format`: how prompts were written; since 0.4.0, the `data` config it trained on, with the
number of windows validation scored), `state_dict` the weights under "model.". A directory with a
config.json is a Hugging Face checkpoint (GPT-2 or Llama, see gpt.interop).
"""

from __future__ import annotations

import hashlib
import pickle
import warnings
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from gpt.config import ARCHITECTURE, DataConfig, ModelConfig, OptimConfig
from gpt.errors import UserError, first_line
from gpt.interop.hf import is_hf_dir
from gpt.interop.load import load_hf_dir
from gpt.model.encoder_decoder import build_model
from gpt.model.transformer import GPT
from gpt.templates import template_of
from gpt.tokenizer import Tokenizer, tokenizer_from_dict

# Where a run dir names its checkpoint for inference (generate, export, load_model).
LAST = "last.ckpt"
# What a user is told to do about a checkpoint that is not one: to generate or export, to resume.
PASS_ANOTHER = "pass another ckpt=PATH"
RESUME_ANOTHER = "pass another ckpt_path, or start a new run dir (hydra.run.dir=...)"


def run_checkpoints(run_dir: str | Path) -> list[Path]:
    """A run's checkpoints, most recently written first: checkpoints/*.ckpt, and the
    hpc_ckpt_N.ckpt Lightning writes into the run dir when SLURM signals a requeue."""
    run_dir = Path(run_dir)
    found = [*run_dir.glob("checkpoints/*.ckpt"), *run_dir.glob("hpc_ckpt_*.ckpt")]
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


def newest_checkpoint(run_dir: str | Path, *, readable: bool = True, warn: bool = False) -> Path | None:
    """The run's newest checkpoint; with `readable`, the newest one that opens, newer unreadable ones
    (a partial or corrupt file) passed over, with a warning each if `warn`."""
    for path in run_checkpoints(run_dir):
        if not readable:
            return path
        _, problem = _open(path, mmap=True)  # mmap: the tensors are not read
        if problem is None:
            return path
        if warn:
            warnings.warn(f"skipping unreadable checkpoint {path} ({problem})", stacklevel=3)
    return None


def find_checkpoint(path: str | Path | None, runs_dir: str | Path = "runs") -> Path:
    """What a user's ckpt= names: a .ckpt file or a Hugging Face checkpoint directory as given; a run
    dir's checkpoints/last.ckpt; or, for None, the newest last.ckpt under runs_dir."""
    if path is None:
        found = sorted(
            Path(runs_dir).expanduser().glob(f"**/checkpoints/{LAST}"), key=lambda p: p.stat().st_mtime
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
        for candidate in (p / "checkpoints" / LAST, p / LAST):
            if candidate.is_file():
                return candidate
        raise UserError(
            f"no {LAST} (or config.json) in {p}; pass a .ckpt file, a run dir or a Hugging Face dir"
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


# Prefixes wrappers add to parameter names: the LightningModule's attribute, torch.compile's module.
STRIP_PREFIXES = ("model.", "_orig_mod.")


def clean_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The network's own parameter names: strip wrapper prefixes, in this one place."""
    out = {}
    for key, value in state_dict.items():
        for prefix in STRIP_PREFIXES:
            key = key.removeprefix(prefix)
        out[key] = value
    return out


def _open(path: Path, mmap: bool) -> tuple[dict[str, Any], None] | tuple[None, str]:
    """The one opener: (the checkpoint's plain data, None), or (None, what is wrong with the file)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # a damaged or foreign file makes torch.load raise many types (KeyError too)
        # torch.save writes a zip archive: anything else is truncated or another kind of file, and
        # torch's own message for it ("Weights only load failed...", "Invalid argument") misleads.
        if not zipfile.is_zipfile(path):
            return None, "not the zip archive torch.save writes: truncated, or another kind of file"
        if isinstance(e, pickle.UnpicklingError):
            return None, "it holds Python objects besides tensors and plain data, which weights_only refuses"
        return None, first_line(e, limit=200)
    if not isinstance(ckpt, dict):
        return None, f"it holds a {type(ckpt).__name__}, not the dict train.py writes"
    return ckpt, None


def not_a_checkpoint(path: str | Path, problem: str, fix: str = PASS_ANOTHER) -> UserError:
    """The one error text for a file that is not a checkpoint of this trainer."""
    return UserError(f"{path} is not a checkpoint ({problem}); {fix}")


def read_checkpoint(path: Path, mmap: bool = False, fix: str = PASS_ANOTHER) -> dict[str, Any]:
    """The checkpoint's plain data; mmap=True leaves the tensors on disk until they are read. `fix`
    ends the error: what the user can do instead."""
    ckpt, problem = _open(path, mmap)
    if ckpt is None:
        raise not_a_checkpoint(path, problem, fix) from None
    return ckpt


def describe_tokenizer(d: dict[str, Any]) -> str:
    if d.get("kind") == "char":
        return f"a {len(d.get('chars', ''))}-character vocabulary"
    if d.get("kind") == "bpe":  # two trained on other corpora (or settings) differ in their ranks
        digest = hashlib.sha256(str(d.get("ranks")).encode()).hexdigest()[:8]
        return f"a trained BPE ({d.get('name')}, ranks {digest})"
    return f"tokenizer {d.get('name', d)!r}"


def check_vocabulary(path: Path, config: ModelConfig, tokenizer: Tokenizer) -> None:
    """A tokenizer with ids past the model's embedding is not the one the model was trained with."""
    if config.vocab_size is not None and tokenizer.vocab_size > config.vocab_size:
        raise UserError(
            f"{path}: its tokenizer has {tokenizer.vocab_size} tokens but its model only "
            f"vocab_size={config.vocab_size}, so the tokenizer saved with it is not the one it was "
            "trained with; pass another ckpt=PATH"
        )


def checkpoint_model(
    ckpt: dict[str, Any], path: Path, fix: str = PASS_ANOTHER
) -> tuple[ModelConfig, Tokenizer]:
    """The model config and tokenizer that a checkpoint (as read_checkpoint returns it) describes."""
    try:
        hparams = ckpt["hyper_parameters"]
        config = ModelConfig(**hparams["model"])
        tokenizer = tokenizer_from_dict(hparams["tokenizer"])
    except (KeyError, TypeError) as e:
        raise not_a_checkpoint(path, f"it has no {e}", fix) from None
    check_vocabulary(path, config, tokenizer)
    return config, tokenizer


def checkpoint_data_format(ckpt: dict[str, Any], path: Path) -> dict[str, Any] | None:
    """How a checkpoint's training prompts were written (gpt.data.pairs.data_format), checked; None
    for a model trained on text (or saved before checkpoints kept it)."""
    data_format = (ckpt.get("hyper_parameters") or {}).get("data_format")
    if data_format is not None:
        try:
            template_of(data_format)
        except (KeyError, TypeError):
            raise not_a_checkpoint(path, "its data_format is not a prompt template's") from None
    return data_format


def checkpoint_data_config(ckpt: dict[str, Any]) -> DataConfig | None:
    """The data config a checkpoint was trained on (val_windows resolved to a number); None for a
    checkpoint that does not record it (saved before 0.4.0, or weights saved without it)."""
    data = (ckpt.get("hyper_parameters") or {}).get("data")
    return None if data is None else DataConfig(**data)


@dataclass
class LoadedRun:
    """What a checkpoint holds for inference."""

    model: GPT
    tokenizer: Tokenizer
    # How its training prompts were written (gpt.data.pairs.data_format; format a prompt with
    # gpt.templates.format_prompt); None for a model trained on text, and for Hugging Face dirs.
    data_format: dict[str, Any] | None
    # The file (or Hugging Face dir) loaded.
    path: Path


def load_model(
    path: str | Path | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    runs_dir: str | Path = "runs",
) -> tuple[GPT, Tokenizer]:
    """The model (in eval mode) and tokenizer of a checkpoint; see find_checkpoint for `path`."""
    run = load_run(path, device, dtype, runs_dir)
    return run.model, run.tokenizer


def load_run(
    path: str | Path | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    runs_dir: str | Path = "runs",
) -> LoadedRun:
    """load_model's model and tokenizer, with the checkpoint's data_format and path."""
    ckpt_path = find_checkpoint(path, runs_dir)
    if ckpt_path.is_dir():
        model, tokenizer = load_hf_dir(ckpt_path)
        check_vocabulary(ckpt_path, model.config, tokenizer)
        return LoadedRun(model.to(device=device, dtype=dtype), tokenizer, None, ckpt_path)
    ckpt = read_checkpoint(ckpt_path)
    config, tokenizer = checkpoint_model(ckpt, ckpt_path)
    try:
        state_dict = clean_state_dict(ckpt["state_dict"])
    except (KeyError, TypeError) as e:
        raise not_a_checkpoint(ckpt_path, f"it has no {e}") from None
    data_format = checkpoint_data_format(ckpt, ckpt_path)
    model = build_model(config)
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:  # missing, unexpected or mis-shaped weights
        raise UserError(
            f"{ckpt_path}: its weights do not match its model config ({first_line(e, limit=200)}); "
            f"the file was edited or damaged, {PASS_ANOTHER}"
        ) from None
    return LoadedRun(model.to(device=device, dtype=dtype).eval(), tokenizer, data_format, ckpt_path)


def check_resumable(path: str | Path, config: ModelConfig, tokenizer: Tokenizer) -> None:
    """Refuse, in one line, a checkpoint that a run with this model and tokenizer cannot continue:
    Lightning would fail deep inside its load with a traceback or, for another vocabulary of the
    same size, go on training with every token's meaning changed."""
    ckpt = read_checkpoint(Path(path), mmap=True, fix=RESUME_ANOTHER)  # shapes only: weights stay on disk
    if not isinstance(ckpt.get("state_dict"), dict):
        raise not_a_checkpoint(path, "it has no state_dict", RESUME_ANOTHER)
    hparams = ckpt.get("hyper_parameters") or {}
    saved_tokenizer, ours_tokenizer = hparams.get("tokenizer"), tokenizer.to_dict()
    if saved_tokenizer is not None and saved_tokenizer != ours_tokenizer:
        raise UserError(
            f"{path} was trained with {describe_tokenizer(saved_tokenizer)} but this run's data.tokenizer "
            f"gives {describe_tokenizer(ours_tokenizer)}; resume with the data settings it was trained with, "
            "or start a new run dir (hydra.run.dir=...)"
        )
    with torch.device("meta"):
        ours = {k: tuple(v.shape) for k, v in build_model(config).state_dict().items()}
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
    tokenizer: Tokenizer,
    path: str | Path,
    optim: dict[str, Any] | None = None,
    data_format: dict[str, Any] | None = None,
    data: DataConfig | None = None,
) -> Path:
    """Save a model in the plain format train.py's checkpoints have (hyper_parameters with the model,
    optim and tokenizer dicts, the data_format and the data config; weights under "model."), weights
    only: for models made outside a training run (random weights for benchmarks and tests, imported
    weights)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    hparams = {
        "model": asdict(model.config),
        "optim": optim or asdict(OptimConfig()),
        "tokenizer": tokenizer.to_dict(),
        "data_format": data_format,
        "data": None if data is None else asdict(data),
    }
    state_dict = {f"model.{k}": v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save({"hyper_parameters": hparams, "state_dict": state_dict}, path)
    return path


def resolve_device(device: str) -> torch.device:
    """`auto`, or a device this machine has: checked before the checkpoint is loaded."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UserError(f"device={device!r} is not a torch device; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UserError(f"device={device} but torch finds no CUDA GPU here; use device=cpu or auto")
        if dev.index is not None and dev.index >= count:
            raise UserError(
                f"device={device} but this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}; "
                "pick one of those"
            )
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"device={device} but MPS is not available on this machine; use device=cpu or auto")
    return dev
