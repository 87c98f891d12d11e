"""Export a checkpoint as a Hugging Face directory that transformers loads with
AutoModelForCausalLM.from_pretrained(DIR).

The command that finds and loads the checkpoint is export.py at the repository root.

GPT-2 format for learned positions + LayerNorm + GELU + biases, Llama format for RoPE + RMSNorm +
SwiGLU; anything else stops with one line naming the option in the way. Weights go to
model.safetensors (a tied head once), plus GPT-2's tokenizer files when the tokenizer is r50k_base, or
a tokenizer.json when it is a BPE trained on the corpus (data.tokenizer=train).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from gpt.bpe import bpe_merge_of, byte_to_unicode, hf_tokenizer
from gpt.interop.hf import TOKENIZER_FILE, hf_config, hf_format, to_hf_state_dict
from gpt.model.transformer import GPT
from gpt.tokenizer import ENDOFTEXT, BPETokenizer, CharTokenizer, TiktokenTokenizer, Tokenizer

EOT = ENDOFTEXT


def write_gpt2_tokenizer(tokenizer: TiktokenTokenizer, out: Path, max_length: int) -> None:
    """vocab.json, merges.txt and tokenizer_config.json of GPT-2's BPE, built from tiktoken's ranks
    (r50k_base's ranks are GPT-2's token ids; its split pattern is GPT-2's)."""
    enc = tokenizer.enc
    ranks = {enc.decode_single_token_bytes(i): i for i in range(enc.eot_token)}
    to_char = byte_to_unicode()
    show = lambda b: "".join(to_char[x] for x in b)
    vocab = {show(token): rank for token, rank in ranks.items()} | {EOT: enc.eot_token}
    merges = [bpe_merge_of(token, ranks) for token in sorted(ranks, key=ranks.get) if len(token) > 1]
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    lines = ["#version: 0.2", *(f"{show(a)} {show(b)}" for a, b in merges)]
    (out / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    config = {
        "tokenizer_class": "GPT2Tokenizer",
        "model_max_length": max_length,
        "add_prefix_space": False,
        "bos_token": EOT,
        "eos_token": EOT,
        "unk_token": EOT,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def write_bpe_tokenizer(tokenizer: BPETokenizer, out: Path, max_length: int) -> None:
    """tokenizer.json (the trained BPE in Hugging Face's format, gpt.bpe.hf_tokenizer) and
    tokenizer_config.json, which AutoTokenizer loads as a PreTrainedTokenizerFast."""
    hf_tokenizer(tokenizer).save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": max_length,
        "bos_token": EOT,
        "eos_token": EOT,
        "additional_special_tokens": tokenizer.special_tokens[1:],
        # decode gives the text back as it was: no space dropped before punctuation.
        "clean_up_tokenization_spaces": False,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def export(
    model: GPT,
    tokenizer: Tokenizer,
    out: str | Path,
    fmt: str = "auto",
    dtype: torch.dtype = torch.float32,
) -> tuple[str, list[str]]:
    """Write the Hugging Face directory; returns the format used and notes for the user."""
    fmt = hf_format(model.config, fmt)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    weights = {k: v.to(dtype) for k, v in to_hf_state_dict(model, fmt).items()}
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    config = hf_config(model.config, fmt, tokenizer.eot_token) | {"dtype": str(dtype).removeprefix("torch.")}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / TOKENIZER_FILE).write_text(json.dumps(tokenizer.to_dict()))
    notes = []
    if isinstance(tokenizer, BPETokenizer):
        write_bpe_tokenizer(tokenizer, out, model.config.block_size)
    elif isinstance(tokenizer, TiktokenTokenizer) and tokenizer.name == "r50k_base":
        write_gpt2_tokenizer(tokenizer, out, model.config.block_size)
    else:
        name = "a character vocabulary" if isinstance(tokenizer, CharTokenizer) else tokenizer.name
        notes.append(
            f"no Hugging Face tokenizer files written: {name} is only exported for r50k_base and "
            f"trained BPEs; {TOKENIZER_FILE} describes it for this trainer's load_model"
        )
    return fmt, notes
