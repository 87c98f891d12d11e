"""Hugging Face checkpoint directories and hub names -> our GPT: load one for inference, or read one to
start a training run from (init_from=, decided in gpt.train.init_from)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from gpt.config import ModelConfig
from gpt.errors import UserError
from gpt.interop.hf import GPT2_VOCAB, TOKENIZER_FILE, from_hf_state_dict, is_hf_dir, model_config_from_hf
from gpt.model.transformer import GPT
from gpt.tokenizer import tokenizer_from_dict

# init_from=NAME downloads these from the hub.
HUB_MODELS = {
    "gpt2": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large",
    "gpt2-xl": "openai-community/gpt2-xl",
}


# ----------------------------------------------------------------------------- directories


def read_hf_weights(path: Path) -> dict[str, torch.Tensor]:
    """All weights of a checkpoint dir: model.safetensors, a sharded index, or pytorch_model.bin."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (path / "model.safetensors").is_file():
        files = ["model.safetensors"]
    elif (path / "pytorch_model.bin").is_file():
        try:
            return torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
        except Exception as e:  # pickles with code in them, truncated files
            raise UserError(
                f"{path}/pytorch_model.bin could not be read safely ({type(e).__name__})"
            ) from None
    else:
        raise UserError(f"{path} has config.json but no model.safetensors or pytorch_model.bin")
    from safetensors.torch import load_file  # a dependency; imported here as only this reads it

    sd: dict[str, torch.Tensor] = {}
    for name in files:
        sd.update(load_file(path / name, device="cpu"))
    return sd


def read_hf_config(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path}/config.json is not readable JSON ({e})") from None


def read_hf_state_dict(path: Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """A GPT-2 or Llama checkpoint directory's model config and weights, under our names."""
    hf = read_hf_config(path)
    config = model_config_from_hf(hf)
    return config, from_hf_state_dict(read_hf_weights(path), config, hf["model_type"])


def load_hf_model(path: str | Path) -> GPT:
    """Our GPT (eval mode, float32) with the weights of a GPT-2 or Llama checkpoint directory."""
    config, state_dict = read_hf_state_dict(Path(path))
    model = GPT(config)
    model.load_state_dict({k: v.float() for k, v in state_dict.items()}, strict=True)
    return model.eval()


def hf_tokenizer_description(path: str | Path) -> dict[str, Any]:
    """Our tokenizer description for a checkpoint directory: the one an export saved, else GPT-2's
    BPE for a GPT-2 checkpoint with its vocabulary."""
    path = Path(path)
    if (path / TOKENIZER_FILE).is_file():
        return json.loads((path / TOKENIZER_FILE).read_text())
    hf = read_hf_config(path)
    if hf.get("model_type") == "gpt2" and hf.get("vocab_size", 0) >= GPT2_VOCAB:
        return {"kind": "tiktoken", "name": "r50k_base"}
    raise UserError(
        f"cannot tell which tokenizer {path} uses: only GPT-2 checkpoints (r50k_base) and this "
        f"trainer's exports ({TOKENIZER_FILE}) are supported"
    )


def load_hf_dir(path: str | Path):
    """(model, tokenizer) of a checkpoint directory, as gpt.runs.checkpoint.load_model returns them."""
    model = load_hf_model(path)
    return model, tokenizer_from_dict(hf_tokenizer_description(path))


# ----------------------------------------------------------------------------- init_from


def resolve_init_from(source: str) -> Path:
    """A local checkpoint directory, or a GPT-2 name downloaded from the hub (huggingface_hub)."""
    path = Path(source).expanduser()
    if is_hf_dir(path):
        return path
    if source not in HUB_MODELS:
        raise UserError(
            f"init_from={source} is neither a directory with config.json nor one of "
            f"{', '.join(HUB_MODELS)}; pass a Hugging Face checkpoint directory"
        )
    try:
        from huggingface_hub import snapshot_download  # optional: pip install -e ".[hf]"
    except ImportError:
        raise UserError(
            f"init_from={source} downloads from the Hugging Face hub, which needs huggingface_hub: "
            "pip install -e '.[hf]', or pass a local checkpoint directory"
        ) from None
    try:
        return Path(snapshot_download(HUB_MODELS[source], allow_patterns=["config.json", "*.safetensors"]))
    except Exception as e:  # offline, DNS, HTTP and cache errors come as many types
        raise UserError(
            f"could not download {HUB_MODELS[source]} from the Hugging Face hub ({type(e).__name__}); "
            "check the network, or pass a local checkpoint directory as init_from=DIR"
        ) from None
