"""Hugging Face interop: our GPT <-> transformers' GPT-2, Llama and Qwen3 checkpoint directories.

A Hugging Face checkpoint directory holds `config.json` and the weights (`model.safetensors`,
sharded `model-*.safetensors` with an index, or `pytorch_model.bin`). Two of its architectures
are our model under other names:

- GPT-2 (`GPT2LMHeadModel`): learned positions, LayerNorm with bias, GELU (tanh) MLP, or squared
  ReLU (`activation_function: relu2`, our ffn=relu2). Our parameter names are GPT-2's, under
  `transformer.`; its Conv1D layers store (in, out) matrices, the transpose of nn.Linear's.
- Llama (`LlamaForCausalLM`): RoPE (rotating halves, as ours does), RMSNorm, SwiGLU. Its separate
  q/k/v and gate/up projections are our fused c_attn and c_fc split along the output dim.
- Qwen3 (`Qwen3ForCausalLM`): Llama's with an RMSNorm of each head's queries and keys before RoPE,
  our qk_norm (`q_norm`, `k_norm`).

Value embeddings and a logit soft cap have no equivalent in these three and are refused.

This module reads and maps; gpt.interop.export writes directories, gpt.interop.load loads them.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from gpt.config import ModelConfig
from gpt.errors import UserError
from gpt.model.transformer import GPT

# Written next to an export: our own tokenizer description, so loading the directory back gives
# exactly the tokenizer the model was trained with (also for character vocabularies).
TOKENIZER_FILE = "gpt_tokenizer.json"
GPT2_VOCAB = 50257  # r50k_base: GPT-2's BPE
# Linear layers of a block: GPT-2 stores them as Conv1D, (in, out).
_CONV1D = re.compile(r"h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight$")
# Buffers some GPT-2 checkpoints carry (the causal mask), not weights.
_GPT2_BUFFERS = re.compile(r"\.attn\.(bias|masked_bias)$")
FORMATS = ("auto", "gpt2", "llama", "qwen3")  # of export.py; auto picks one from the config


def is_hf_dir(path: str | Path) -> bool:
    return Path(path, "config.json").is_file()


# ----------------------------------------------------------------------------- configs


def check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise UserError(
            f"unknown export format {fmt!r}; use format={', '.join(FORMATS[:-1])} or {FORMATS[-1]}"
        )


def hf_format(config: ModelConfig, fmt: str = "auto") -> str:
    """The Hugging Face architecture that expresses `config`: "gpt2", "llama" or "qwen3".

    Raises a UserError naming the first option neither (or the requested one) can express.
    """
    check_format(fmt)
    if config.arch == "encoder_decoder":
        # T5 is the nearest (pre-norm), yet it has relative position buckets, no learned or rotary
        # positions, and an unscaled attention: no Hugging Face class computes this model.
        raise UserError(
            "arch=encoder_decoder has no Hugging Face equivalent (GPT-2 and Llama are decoder-only; T5 "
            "differs in positions and attention scaling); use this model with generate.py and evaluate.py"
        )
    if config.pos_emb == "sinusoidal":
        raise UserError("pos_emb=sinusoidal has no Hugging Face equivalent; export needs learned or rope")
    if config.prefix_lm:
        # GPT-2 and Llama attend causally everywhere: the exported model would compute another function.
        raise UserError(
            "prefix_lm=true (the prompt attended both ways) has no GPT-2 or Llama equivalent, which are "
            "causal everywhere; use this model with generate.py and evaluate.py instead"
        )
    if config.value_embeds:
        raise UserError(
            "value_embeds=true (an embedding mixed into attention's values, on in model=speedrun) has no "
            "GPT-2, Llama or Qwen3 equivalent; export needs a model trained with model.value_embeds=false "
            "(this one works with generate.py, evaluate.py and serve.py)"
        )
    if config.logit_softcap is not None:
        raise UserError(
            f"logit_softcap={config.logit_softcap} has no GPT-2, Llama or Qwen3 equivalent (Gemma 2 caps its "
            "logits, but differs in other ways); export needs a model trained without it"
        )
    if fmt == "auto":
        fmt = "gpt2" if config.pos_emb == "learned" else "qwen3" if config.qk_norm else "llama"
    # Each format's requirements (the values it accepts), in the order the message should name them.
    needs = {
        "gpt2": {
            "pos_emb": ["learned"],
            "norm": ["layernorm"],
            "ffn": ["gelu", "relu2"],
            "bias": [True],
            "qk_norm": [False],
        },
        "llama": {"pos_emb": ["rope"], "norm": ["rmsnorm"], "ffn": ["swiglu"], "qk_norm": [False]},
        "qwen3": {
            "pos_emb": ["rope"],
            "norm": ["rmsnorm"],
            "ffn": ["swiglu"],
            "qk_norm": [True],
            "bias": [False],
        },
    }[fmt]
    for name, wants in needs.items():
        have = getattr(config, name)
        if have not in wants:
            raise UserError(
                f"{name}={str(have).lower()} cannot be exported in {fmt} format, which needs {name}="
                f"{' or '.join(str(w).lower() for w in wants)} (gpt2: learned positions, layernorm, gelu or "
                "relu2, bias; llama: rope, rmsnorm, swiglu; qwen3: llama's with qk_norm, no bias)"
            )
    return fmt


def hf_config(config: ModelConfig, fmt: str, eot_token: int | None) -> dict[str, Any]:
    """config.json for an export of `config` in format `fmt` (see hf_format)."""
    common = {
        "vocab_size": config.vocab_size,
        "tie_word_embeddings": config.tie_embeddings,
        "initializer_range": config.init_std,
        "bos_token_id": eot_token,
        "eos_token_id": eot_token,
        "use_cache": True,
        "dtype": "float32",
    }
    if fmt == "gpt2":
        return {
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "n_layer": config.n_layer,
            "n_head": config.n_head,
            "n_embd": config.n_embd,
            "n_positions": config.block_size,
            "n_inner": config.hidden_dim,
            # GELU's tanh approximation, as ours; or relu(x)**2
            "activation_function": "relu2" if config.ffn == "relu2" else "gelu_new",
            "layer_norm_epsilon": config.norm_eps,
            "resid_pdrop": config.dropout,
            "embd_pdrop": config.dropout,
            "attn_pdrop": config.dropout,
            "scale_attn_weights": True,
            "scale_attn_by_inverse_layer_idx": False,
            "reorder_and_upcast_attn": False,
            **common,
        }
    llama = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.n_head,
        "hidden_size": config.n_embd,
        "head_dim": config.head_dim,
        "intermediate_size": config.hidden_dim,
        "max_position_embeddings": config.block_size,
        "hidden_act": "silu",
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_base,
        "attention_bias": config.bias,
        "mlp_bias": config.bias,
        "attention_dropout": config.dropout,
        **common,
    }
    if fmt == "llama":
        return llama
    # Qwen3: Llama's fields, its MLP without biases, no sliding window.
    del llama["mlp_bias"]
    return llama | {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "use_sliding_window": False}


def _require(hf: dict[str, Any], key: str, ok: bool, want: str) -> None:
    if not ok:
        raise UserError(f"config.json has {key}={hf.get(key)!r}; this trainer's model needs {want}")


def model_config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """Our ModelConfig for a GPT-2 or Llama config.json; one line naming what we cannot express."""
    kind = hf.get("model_type")
    tie = hf.get("tie_word_embeddings", True)
    if kind == "gpt2":
        act = hf.get("activation_function", "gelu_new")
        _require(
            hf, "activation_function", act in ("gelu_new", "gelu_pytorch_tanh", "relu2"), "gelu_new or relu2"
        )
        _require(hf, "scale_attn_weights", hf.get("scale_attn_weights", True), "true")
        _require(
            hf, "scale_attn_by_inverse_layer_idx", not hf.get("scale_attn_by_inverse_layer_idx"), "false"
        )
        _require(hf, "add_cross_attention", not hf.get("add_cross_attention"), "false")
        return ModelConfig(
            n_layer=hf["n_layer"],
            n_head=hf["n_head"],
            n_embd=hf["n_embd"],
            block_size=hf["n_positions"],
            vocab_size=hf["vocab_size"],
            pos_emb="learned",
            norm="layernorm",
            ffn="relu2" if act == "relu2" else "gelu",
            ffn_hidden=hf.get("n_inner") or 4 * hf["n_embd"],
            bias=True,
            tie_embeddings=tie,
            norm_eps=hf.get("layer_norm_epsilon", 1e-5),
            dropout=0.0,
        )
    if kind in ("llama", "qwen3"):
        n_head, n_embd = hf["num_attention_heads"], hf["hidden_size"]
        _require(hf, "use_sliding_window", not hf.get("use_sliding_window"), "false")
        _require(hf, "hidden_act", hf.get("hidden_act", "silu") == "silu", "silu")
        kv = hf.get("num_key_value_heads") or n_head
        _require(hf, "num_key_value_heads", kv == n_head, f"{n_head} (no grouped-query attention)")
        _require(hf, "head_dim", hf.get("head_dim") in (None, n_embd // n_head), str(n_embd // n_head))
        rope = hf.get("rope_parameters") or {}
        _require(hf, "rope_scaling", not hf.get("rope_scaling"), "null")
        _require(hf, "rope_parameters", rope.get("rope_type", "default") == "default", "rope_type default")
        bias = bool(hf.get("attention_bias", False))
        # Qwen3's MLP has no biases: the attention's must be off too (ours are all or none).
        mlp_bias = bool(hf.get("mlp_bias", False)) if kind == "llama" else False
        _require(hf, "attention_bias" if kind == "qwen3" else "mlp_bias", mlp_bias == bias, f"= {mlp_bias}")
        return ModelConfig(
            n_layer=hf["num_hidden_layers"],
            n_head=n_head,
            n_embd=n_embd,
            block_size=hf["max_position_embeddings"],
            vocab_size=hf["vocab_size"],
            pos_emb="rope",
            norm="rmsnorm",
            ffn="swiglu",
            ffn_hidden=hf["intermediate_size"],
            bias=bias,
            tie_embeddings=tie,
            norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_base=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
            dropout=0.0,
            qk_norm=kind == "qwen3",
        )
    raise UserError(
        f"config.json has model_type={kind!r}; only gpt2, llama and qwen3 checkpoints can be loaded"
    )


# ----------------------------------------------------------------------------- weights


def _llama_name(name: str) -> str:
    """Our name -> Llama's, for the parameters that map one to one."""
    fixed = {"wte.weight": "model.embed_tokens.weight", "ln_f.weight": "model.norm.weight"}
    if name in fixed or name == "lm_head.weight":
        return fixed.get(name, name)
    layer, rest = re.match(r"h\.(\d+)\.(.+)$", name).groups()
    rest = {
        "ln_1.weight": "input_layernorm.weight",
        "ln_2.weight": "post_attention_layernorm.weight",
        "attn.c_proj.weight": "self_attn.o_proj.weight",
        "attn.c_proj.bias": "self_attn.o_proj.bias",
        "mlp.c_proj.weight": "mlp.down_proj.weight",
        "mlp.c_proj.bias": "mlp.down_proj.bias",
        "attn.q_norm.weight": "self_attn.q_norm.weight",  # qwen3
        "attn.k_norm.weight": "self_attn.k_norm.weight",
    }[rest]
    return f"model.layers.{layer}.{rest}"


# Our fused matrices and the Llama parameters they hold, in order along the output dim.
_LLAMA_FUSED = {
    "attn.c_attn": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "mlp.c_fc": ("mlp.gate_proj", "mlp.up_proj"),
}


def to_hf_state_dict(model: GPT, fmt: str) -> dict[str, torch.Tensor]:
    """Our weights under the format's names; a tied head is left out (tie_word_embeddings)."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and model.config.tie_embeddings:
            continue
        tensor = tensor.detach()
        if fmt == "gpt2":
            hf_name = name if name == "lm_head.weight" else f"transformer.{name}"
            out[hf_name] = tensor.t() if _CONV1D.search(name) else tensor
            continue
        fused = re.match(r"h\.(\d+)\.(attn\.c_attn|mlp\.c_fc)\.(weight|bias)$", name)
        if fused:
            layer, module, kind = fused.groups()
            parts = _LLAMA_FUSED[module]
            for part, piece in zip(parts, tensor.chunk(len(parts), dim=0), strict=True):
                out[f"model.layers.{layer}.{part}.{kind}"] = piece
        else:
            out[_llama_name(name)] = tensor
    # safetensors wants contiguous tensors that share no memory (chunks and transposes are views).
    return {k: v.contiguous().clone() for k, v in out.items()}


def from_hf_state_dict(
    hf_sd: dict[str, torch.Tensor], config: ModelConfig, fmt: str
) -> dict[str, torch.Tensor]:
    """The inverse of to_hf_state_dict: a state dict for GPT(config). Missing weights raise UserError."""
    if fmt == "gpt2":
        # Hub GPT-2 checkpoints were saved from GPT2Model (no "transformer." prefix); ours were not.
        hf_sd = {k.removeprefix("transformer."): v for k, v in hf_sd.items() if not _GPT2_BUFFERS.search(k)}
    with torch.device("meta"):  # parameter names only: no memory allocated
        names = list(GPT(config).state_dict().keys())
    out: dict[str, torch.Tensor] = {}
    for name in names:
        if name == "lm_head.weight" and config.tie_embeddings:
            out[name] = _get(hf_sd, "wte.weight" if fmt == "gpt2" else "model.embed_tokens.weight")
            continue
        if fmt == "gpt2":
            tensor = _get(hf_sd, name)
            out[name] = tensor.t() if _CONV1D.search(name) else tensor
            continue
        fused = re.match(r"h\.(\d+)\.(attn\.c_attn|mlp\.c_fc)\.(weight|bias)$", name)
        if fused:
            layer, module, kind = fused.groups()
            out[name] = torch.cat(
                [_get(hf_sd, f"model.layers.{layer}.{p}.{kind}") for p in _LLAMA_FUSED[module]]
            )
        else:
            out[name] = _get(hf_sd, _llama_name(name))
    return {k: v.contiguous() for k, v in out.items()}


def _get(sd: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in sd:
        raise UserError(f"the checkpoint has no weight {key!r}; its config.json and weights disagree")
    return sd[key]
