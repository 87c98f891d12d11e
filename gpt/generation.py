"""Autoregressive generation: sample_next, prefill, decode_step and one generate() loop.

`generate(..., use_cache=False)` recomputes the whole context every step: it is the reference the
cached path is tested against. Both paths see exactly the same context: when prompt plus new
tokens reach block_size, the context slides to its last block_size // 2 tokens and is prefilled
again (cached) or simply cropped (uncached), so the two stay token-for-token identical.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

from gpt.checkpoint import load_model
from gpt.config import GenerateConfig
from gpt.errors import UserError
from gpt.kv_cache import KVCache
from gpt.model import GPT
from gpt.tokenizer import StreamDecoder


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """logits (B, V) -> next tokens (B,). temperature 0 is greedy (argmax)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = F.softmax(sorted_logits, dim=-1)
        # Drop a token when the tokens ranked above it already hold top_p of the mass: the most
        # likely token always stays.
        drop_sorted = probs.cumsum(dim=-1) - probs >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


def prefill(model: GPT, idx: torch.Tensor, kv_cache: KVCache | None) -> torch.Tensor:
    """Run the whole context idx (B, T) through the model; logits of its last position (B, V)."""
    if kv_cache is not None:
        kv_cache.reset()
    return model(idx, kv_cache=kv_cache)[:, -1, :]


def decode_step(model: GPT, context: torch.Tensor, kv_cache: KVCache | None) -> torch.Tensor:
    """Logits (B, V) after the last token of context (B, T). With a cache only that token is run."""
    if kv_cache is None:
        return model(context)[:, -1, :]
    return model(context[:, -1:], kv_cache=kv_cache)[:, -1, :]


@torch.inference_mode()
def generate(
    model: GPT,
    idx: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    vocab_size: int | None = None,
) -> Iterator[torch.Tensor]:
    """Yield max_new_tokens new tokens, one (B,) tensor per step, continuing prompts idx (B, T).

    vocab_size: sample only ids below it, for a model whose embedding was padded past its
    tokenizer's vocabulary (the padding rows belong to no token).
    """
    block = model.config.block_size
    context = idx[:, -block:]
    param = next(model.parameters())
    cache = (
        KVCache.for_model(model.config, idx.size(0), device=param.device, dtype=param.dtype)
        if use_cache
        else None
    )
    logits = prefill(model, context, cache)
    for step in range(max_new_tokens):
        token = sample_next(logits[:, :vocab_size], temperature, top_k, top_p, generator)  # (B,)
        yield token
        if step == max_new_tokens - 1:
            break
        context = torch.cat([context, token[:, None]], dim=1)
        if context.size(1) > block:
            context = context[:, -(block // 2) :]
            logits = prefill(model, context, cache)
        else:
            logits = decode_step(model, context, cache)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def write_stdout(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def sample(cfg: GenerateConfig, write: Callable[[str], object] = write_stdout) -> list[str]:
    """The generate.py command: load the checkpoint, stream num_samples continuations of the prompt
    through `write` as they are decoded, and return the generated texts."""
    device = resolve_device(cfg.device)
    model, tokenizer = load_model(
        cfg.ckpt, device=device, dtype=getattr(torch, cfg.dtype), runs_dir=cfg.runs_dir
    )
    prompt_ids = tokenizer.encode(cfg.prompt)
    if not prompt_ids:
        raise UserError("the prompt encodes to no tokens; give a non-empty prompt")
    block = model.config.block_size
    if len(prompt_ids) > block:
        print(
            f"note: prompt has {len(prompt_ids)} tokens; keeping its last {block} (block_size)",
            file=sys.stderr,
        )
    idx = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    texts = []
    for i in range(cfg.num_samples):
        if i:
            write("---------------\n")
        write(cfg.prompt)
        decoder, pieces = StreamDecoder(tokenizer), []
        tokens = generate(
            model,
            idx,
            cfg.max_new_tokens,
            cfg.temperature,
            cfg.top_k,
            cfg.top_p,
            generator,
            cfg.use_cache,
            vocab_size=tokenizer.vocab_size,
        )
        for token in tokens:
            pieces.append(decoder.push([int(token[0])]))
            write(pieces[-1])
        pieces.append(decoder.flush())
        write(pieces[-1] + "\n")
        texts.append("".join(pieces))
    return texts
