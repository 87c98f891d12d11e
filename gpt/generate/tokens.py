"""Token-level generation: sample_next, prefill, decode_step, one generate() loop, beam search.

`generate(..., use_cache=False)` recomputes the whole context every step: it is the reference the
cached path is tested against. Both paths see exactly the same context (`Context` below), so they
stay token-for-token identical.

Rows of a batch may have different lengths: they are left padded, and `GPT.forward` gets each
row's padding so that a row never attends to it and its positions start after it. Each row is
computed as if it were alone.

Past the context window: when a row outgrows block_size, it keeps its last block_size // 2
tokens, which are run through the model again (a fresh prefill), and generation continues. A
prompt longer than block_size is cropped to its last block_size tokens.

A prefix LM (model.config.prefix_lm) sees the prompt as it was trained to: each row's prompt
tokens (after cropping) attend to each other both ways, and every generated token is causal.
After a slide the prefix is what is left of the prompt in the window (nothing once the prompt has
slid out), so the generated tokens never become prefix and the cached and uncached paths agree.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import cache
from typing import Any

import torch
import torch.nn.functional as F

from gpt.config import SamplingConfig, sampling_config
from gpt.model.kv_cache import KVCache
from gpt.model.transformer import GPT

# ----------------------------------------------------------------------------- sampling


def sample_next(
    logits: torch.Tensor,
    temperature: float,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """logits (B, V) -> next tokens (B,). temperature 0 is greedy (argmax).

    The filters apply in this order to the tempered distribution: top_k, top_p, then min_p (drop
    tokens less likely than min_p times the most likely one). With top_k, only the k candidates
    are filtered and drawn from.
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    candidates = None  # (B, k): the vocabulary ids of `logits`' columns once narrowed to the top k
    if top_k is not None and top_k < logits.size(-1):
        logits, candidates = torch.topk(logits, top_k, dim=-1)  # sorted, most likely first
    if top_p is not None and top_p < 1.0:
        if candidates is None:
            logits, candidates = torch.sort(logits, dim=-1, descending=True)
        probs = F.softmax(logits, dim=-1)
        # Drop a token when the tokens ranked above it already hold top_p of the mass: the most
        # likely token always stays.
        logits = logits.masked_fill(probs.cumsum(dim=-1) - probs >= top_p, float("-inf"))
    probs = F.softmax(logits, dim=-1)
    if min_p is not None and min_p > 0:
        probs = probs.masked_fill(probs < min_p * probs.amax(dim=-1, keepdim=True), 0.0)
    drawn = draw(probs, generator)
    return drawn if candidates is None else candidates.gather(-1, drawn[:, None]).squeeze(-1)


def draw(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One index per row of probs (B, n), drawn in proportion to its (unnormalized) weights.

    Inverse transform sampling: one uniform number per row, found in the running sum of the weights.
    torch.multinomial draws one exponential number per weight instead (50257 of them for GPT-2's
    vocabulary, 1 ms per row on a CPU core), which made sampling cost more than a decode step of
    the model for a batch. The sum is in float64 (float32 on Apple's MPS, which has no float64) so
    that even the least likely token keeps its share; an index of zero weight is never drawn (u < the
    total; the first cumulative weight above u is where a weight was added).
    """
    dtype = torch.float32 if probs.device.type == "mps" else torch.float64
    cdf = probs.to(dtype).cumsum(dim=-1)  # (B, n)
    total = cdf[:, -1:]
    u = torch.rand(total.shape, generator=generator, dtype=dtype, device=probs.device) * total
    u = torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))  # < total, even rounded
    return torch.searchsorted(cdf, u, right=True).squeeze(-1)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Make tokens already in a row (seen (B, V), bool) less likely, as in CTRL: a positive logit
    is divided by the penalty and a negative one multiplied, so a penalty > 1 always lowers it."""
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


# ----------------------------------------------------------------------------- model steps


def prefill(
    model: GPT,
    idx: torch.Tensor,
    kv_cache: KVCache | None,
    pad: torch.Tensor | None = None,
    prefix: torch.Tensor | None = None,
    **source: torch.Tensor | None,
) -> torch.Tensor:
    """Run the whole context idx (B, T) through the model; logits of its last position (B, V).
    prefix (B, T), bool: a prefix LM's prompt tokens. source: an encoder-decoder's source and
    source_pad when the KV cache does not hold them (the uncached path)."""
    if kv_cache is not None:
        kv_cache.reset()
    return model(idx, kv_cache=kv_cache, pad=pad, prefix=prefix, **source)[:, -1, :]


def decode_step(
    model: GPT, token: torch.Tensor, kv_cache: KVCache, pad: torch.Tensor | None = None
) -> torch.Tensor:
    """Logits (B, V) after one new token (B, 1), the rest of the context being in the cache."""
    return model(token, kv_cache=kv_cache, pad=pad)[:, -1, :]


@cache
def compiled_decode_step(backend: str = "inductor") -> Callable[..., torch.Tensor]:
    """decode_step under torch.compile, built once per process. Every call has the same shapes
    (one token, the whole preallocated cache, a tensor position), so it compiles once."""
    return torch.compile(decode_step, backend=backend, fullgraph=True, dynamic=False)


class Context:
    """What the model sees of each row, left padded, and the KV cache that mirrors it.

    Created with the prompts; `append(tokens)` adds one token per row and returns the logits for
    the next one. The uncached path recomputes everything (the reference); the cached path runs
    only the new token, except after the window slid, when the cache is refilled. Every row holds
    as many generated tokens (`generated`) at its right end; what is before them is the prompt.

    An encoder-decoder reads the prompts with its encoder, once (cropped to block_size like a
    decoder's): what the rows hold is the decoder's side, model.config.decoder_start followed by
    the generated tokens, so they all have the same length. The cached path keeps the encoded
    source in the KV cache; the uncached one encodes it again at every step.
    """

    def __init__(
        self,
        model: GPT,
        idx: torch.Tensor,
        lengths: list[int] | None,
        max_new_tokens: int,
        use_cache: bool = True,
        compile: bool | str = False,
    ) -> None:
        self.model = model
        self.block = model.config.block_size
        self.lengths = [idx.size(1)] * idx.size(0) if lengths is None else list(lengths)
        self.tokens = idx
        self.generated = 0
        self.crop(keep=self.block)
        self.source: dict[str, torch.Tensor | None] = {}  # the uncached encoder-decoder's source
        if model.config.arch == "encoder_decoder":
            self.source = {"source": self.tokens, "source_pad": self.pad}
            self.tokens = torch.full((idx.size(0), 1), model.config.decoder_start, device=idx.device)
            self.lengths, self.pad = [1] * idx.size(0), None
        self.cache = None
        if use_cache:
            param = next(model.parameters())
            max_len = min(self.block, self.tokens.size(1) + max_new_tokens)
            self.cache = KVCache.for_model(
                model.config, idx.size(0), max_len, device=param.device, dtype=param.dtype
            )
            if self.source:
                model.encode_into(self.cache, **self.source)
                self.source = {}
        self.step = decode_step
        if compile:
            self.step = compiled_decode_step("inductor" if compile is True else compile)
        self.logits = prefill(
            model, self.tokens, self.cache, self.pad, self.prefix(), **self.source
        )  # (B, V)

    def crop(self, keep: int) -> None:
        """Rows longer than block_size keep their last `keep` tokens; the others stay whole."""
        self.lengths = [n if n <= self.block else keep for n in self.lengths]
        width = max(self.lengths)
        self.tokens = self.tokens[:, -width:]  # (B, width)
        pad = [width - n for n in self.lengths]
        # None when no row is padded: plain causal attention, as in training.
        self.pad = torch.tensor(pad, device=self.tokens.device) if any(pad) else None

    def prefix(self) -> torch.Tensor | None:
        """For a prefix LM, which tokens are prompt (B, width), bool: each row's real tokens before
        the generated ones; None for a causal model, or when no prompt token is left."""
        width = self.tokens.size(1)
        if not self.model.config.prefix_lm or self.generated >= width:
            return None
        slots = torch.arange(width, device=self.tokens.device)[None, :]  # (1, width)
        prompt = slots < width - self.generated  # (1, width)
        if self.pad is not None:
            prompt = prompt & (slots >= self.pad[:, None])  # (B, width): not the left padding
        return prompt.expand(self.tokens.size(0), -1)  # (B, width)

    def append(self, token: torch.Tensor) -> torch.Tensor:
        """token (B,) -> logits (B, V) for the position after it."""
        self.tokens = torch.cat([self.tokens, token[:, None]], dim=1)  # (B, T+1)
        self.lengths = [n + 1 for n in self.lengths]
        self.generated += 1
        if max(self.lengths) > self.block:
            self.crop(keep=self.block // 2)
            self.logits = prefill(self.model, self.tokens, self.cache, self.pad, self.prefix(), **self.source)
        elif self.cache is None:
            self.logits = prefill(self.model, self.tokens, None, self.pad, self.prefix(), **self.source)
        else:
            self.logits = self.step(self.model, token[:, None], self.cache, self.pad)
        return self.logits

    def reorder(self, rows: torch.Tensor) -> None:
        """Row i becomes a copy of row rows[i] (beam search)."""
        self.tokens = self.tokens[rows]
        self.lengths = [self.lengths[i] for i in rows.tolist()]
        if self.pad is not None:
            self.pad = self.pad[rows]
        if self.cache is not None:
            self.cache.reorder(rows)
        self.source = {name: None if t is None else t[rows] for name, t in self.source.items()}
        self.logits = self.logits[rows]


# ----------------------------------------------------------------------------- loops


@torch.inference_mode()
def generate(
    model: GPT,
    idx: torch.Tensor,
    max_new_tokens: int,
    *,
    sampling: SamplingConfig | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    vocab_size: int | None = None,
    lengths: list[int] | None = None,
    eot_token: int | None = None,
    compile: bool | str = False,
    **settings: Any,
) -> Iterator[torch.Tensor]:
    """Yield up to max_new_tokens new tokens, one (B,) tensor per step, continuing prompts idx (B, T).

    sampling: a SamplingConfig (None: its defaults); keyword settings such as temperature=0 replace
    its fields. temperature, top_k, top_p, min_p: see sample_next. repetition_penalty: see
    apply_repetition_penalty; it counts the prompt and every new token of the row.
    lengths: real tokens of each row when idx is left padded (None: every row is T long).
    vocab_size: sample only ids below it, for a model whose embedding was padded past its
    tokenizer's vocabulary (the padding rows belong to no token).
    eot_token: a row that samples it is finished and repeats it; generation stops early once
    every row is finished.
    compile: run the decode step through torch.compile (True, or the name of a backend).
    """
    s = sampling_config(sampling, **settings)  # validated
    ctx = Context(model, idx, lengths, max_new_tokens, use_cache, compile)
    logits = ctx.logits
    seen = None  # (B, V): which tokens each row holds (prompt after cropping, then each new one)
    if s.repetition_penalty != 1.0:
        B, T = ctx.tokens.shape
        real = (
            torch.arange(T, device=idx.device)[None, :]
            >= torch.tensor([T - n for n in ctx.lengths], device=idx.device)[:, None]
        )  # (B, T): False on left padding
        counts = torch.zeros(B, logits.size(-1), dtype=torch.long, device=idx.device)
        seen = counts.scatter_add_(1, ctx.tokens, real.long()) > 0
    done = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
    for step in range(max_new_tokens):
        if seen is not None:
            logits = apply_repetition_penalty(logits, seen, s.repetition_penalty)
        token = sample_next(logits[:, :vocab_size], s.temperature, s.top_k, s.top_p, s.min_p, generator)
        if eot_token is not None:
            token = token.masked_fill(done, eot_token)
            done |= token == eot_token
        yield token
        if step == max_new_tokens - 1 or (eot_token is not None and bool(done.all())):
            break
        if seen is not None:
            seen.scatter_(1, token[:, None], True)
        logits = ctx.append(token)


@torch.inference_mode()
def beam_search(
    model: GPT,
    idx: torch.Tensor,
    max_new_tokens: int,
    num_beams: int,
    *,
    length_penalty: float = 1.0,
    eot_token: int | None = None,
    use_cache: bool = True,
    vocab_size: int | None = None,
    compile: bool | str = False,
) -> list[int]:
    """The most likely continuation of one prompt idx (1, T) that beam search finds.

    Keeps the num_beams most likely partial continuations (sum of token log-probabilities). A beam
    that emits eot_token is finished; finished beams and, at the end, the surviving ones are
    ranked by score / (generated tokens ** length_penalty): a length_penalty above 0 favours
    longer continuations, 0 compares raw log-probabilities. Deterministic: no sampling.
    """
    K = num_beams
    ctx = Context(model, idx.expand(K, -1), None, max_new_tokens, use_cache, compile)
    logits = ctx.logits
    # Every beam starts as the prompt; only the first is alive, so the first step's top K are K
    # different tokens, not K copies of the best one.
    scores = torch.full((K,), float("-inf"), device=idx.device)
    scores[0] = 0.0
    generated = torch.zeros(K, 0, dtype=torch.long, device=idx.device)  # (K, steps)
    finished: list[tuple[float, list[int]]] = []  # (normalized score, tokens without eot)

    def normalized(score: float, n: int) -> float:
        return score / n**length_penalty

    for step in range(1, max_new_tokens + 1):
        logprobs = F.log_softmax(logits[:, :vocab_size].float(), dim=-1)  # (K, V)
        V = logprobs.size(-1)
        candidates = (scores[:, None] + logprobs).view(-1)  # (K * V,)
        top_scores, top_ids = candidates.topk(min(2 * K, candidates.numel()))
        rows, tokens, new_scores = [], [], []
        for score, flat in zip(top_scores.tolist(), top_ids.tolist(), strict=True):
            row, token = divmod(flat, V)
            if score == float("-inf"):
                break
            if token == eot_token:
                finished.append((normalized(score, step), generated[row].tolist()))
                continue
            rows.append(row)
            tokens.append(token)
            new_scores.append(score)
            if len(rows) == K:
                break
        if not rows:  # every candidate ended (a vocabulary of little more than end-of-text)
            break
        if len(rows) < K:  # fewer live candidates than beams (tiny vocabulary): keep the best twice
            rows += rows[:1] * (K - len(rows))
            tokens += tokens[:1] * (K - len(tokens))
            new_scores += [float("-inf")] * (K - len(new_scores))
        rows_t = torch.tensor(rows, device=idx.device)
        token_t = torch.tensor(tokens, device=idx.device)
        scores = torch.tensor(new_scores, device=idx.device)
        generated = torch.cat([generated[rows_t], token_t[:, None]], dim=1)
        best_alive = normalized(float(scores.max()), step)
        worst_kept = sorted(s for s, _ in finished)[-K] if len(finished) >= K else float("-inf")
        if step == max_new_tokens or best_alive < worst_kept:
            break
        ctx.reorder(rows_t)
        logits = ctx.append(token_t)

    n = generated.size(1)
    alive = [(normalized(s, n), generated[i].tolist()) for i, s in enumerate(scores.tolist())]
    return max(finished + alive, key=lambda c: c[0])[1]
