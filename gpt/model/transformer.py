"""A decoder-only transformer in plain PyTorch.

Pre-norm blocks (norm -> attention -> residual, norm -> FFN -> residual), causal self-attention
through F.scaled_dot_product_attention, SwiGLU, GELU or squared-ReLU FFN, learned / sinusoidal /
rotary positions, final norm and an LM head optionally tied to the token embedding. Options from
the GPT-2 speedrun records (docs/architecture.md, "Options"): QK-norm, a logit soft cap,
zero-initialised residual projections, value embeddings. Parameter names
follow GPT-2 (wte, wpe, h, ln_1, attn.c_attn, attn.c_proj, ln_2, mlp, ln_f, lm_head). Plain causal
attention passes no mask (flash kernel); everything else is one dense boolean mask (why:
docs/design.md, "Attention masks")."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from gpt.config import ModelConfig
from gpt.model import flex
from gpt.model.kv_cache import KVCache
from gpt.model.linear import Linear
from gpt.model.loss import soft_cap
from gpt.model.swiglu import swiglu_projection

# ----------------------------------------------------------------------------- helpers


def make_norm(config: ModelConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return nn.RMSNorm(config.n_embd, eps=config.norm_eps)
    return nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias)


def sinusoidal_table(n_pos: int, dim: int) -> torch.Tensor:
    """The fixed position table of "Attention Is All You Need": (n_pos, dim)."""
    pos = torch.arange(n_pos, dtype=torch.float32)[:, None]
    inv_freq = torch.exp(-math.log(10000.0) * torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    table = torch.zeros(n_pos, dim)
    table[:, 0::2] = torch.sin(pos * inv_freq)
    table[:, 1::2] = torch.cos(pos * inv_freq[: dim // 2])
    return table


def rope_tables(n_pos: int, head_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The rotary tables, each (n_pos, head_dim): cos of each pair's angle in both halves, and its
    sin signed as the rotation uses it, -sin in the first half and sin in the second (apply_rope)."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(n_pos, dtype=torch.float32), inv_freq)  # (n_pos, head_dim / 2)
    cos, sin = angles.cos(), angles.sin()
    return torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (first half, second half) of the head dim: (x1 cos - x2 sin, x2 cos + x1 sin),
    written as x * cos + (x2, x1) * sin with the tables of rope_tables (four kernels, not seven; the
    same values bit for bit).

    x: (B, nh, T, hs); cos/sin: (T, hs), or (B, 1, T, hs) when each row has its own positions.
    """
    x32 = x.float()
    x1, x2 = x32.chunk(2, dim=-1)
    return (x32 * cos + torch.cat((x2, x1), dim=-1) * sin).type_as(x)


def attention_mask(
    slots: torch.Tensor,
    n_keys: int,
    pad: torch.Tensor | None = None,
    segments: torch.Tensor | None = None,
    prefix: torch.Tensor | None = None,
) -> torch.Tensor:
    """Which of n_keys key slots each query at `slots` (T,) may see: (B or 1, 1, T, n_keys), bool.

    Causal by slot. prefix (B, T), bool: prefix queries also see the prefix keys after them (a
    prefix LM's prompt); the queries must be the first T slots, as in a prefill, and later slots
    are no prefix. segments (B, T) (packed rows, no cache: the keys are the queries): a query sees
    only keys of its own segment. pad (B,): blind to each row's left padding. A query always sees
    itself, so its row of the softmax is never empty (that would give NaN, and NaN keys and values
    written to the cache would poison later queries even at zero weight).
    """
    keys = torch.arange(n_keys, device=slots.device)[None, :]  # (1, n_keys)
    queries = slots[:, None]  # (T, 1)
    mask = keys <= queries  # (T, n_keys)
    if prefix is not None:
        key_prefix = F.pad(prefix, (0, n_keys - prefix.size(1)))  # (B, n_keys)
        mask = mask | (prefix[:, :, None] & key_prefix[:, None, :])  # (B, T, n_keys)
    if segments is not None:
        mask = mask & (segments[:, :, None] == segments[:, None, :])  # (B, T, T)
    if pad is not None:
        mask = mask & ((keys >= pad[:, None, None]) | (keys == queries))  # (B, T, n_keys)
    return mask.view(-1, 1, *mask.shape[-2:])  # (B or 1, 1, T, n_keys)


# ----------------------------------------------------------------------------- attention


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head = config.n_head
        self.head_dim = config.head_dim
        self.dropout = config.dropout
        self.c_attn = Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.qk_norm = config.qk_norm
        if config.qk_norm:  # over each head's dim, as Qwen3's q_norm / k_norm
            self.q_norm = nn.RMSNorm(config.head_dim, eps=config.norm_eps)
            self.k_norm = nn.RMSNorm(config.head_dim, eps=config.norm_eps)
        if config.value_embeds:  # v = ve_mix[0] * v + ve_mix[1] * value embedding (GPT.init_weights)
            self.ve_mix = nn.Parameter(torch.empty(2))

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        kv_cache: KVCache | None = None,
        mask: torch.Tensor | None = None,
        slots: torch.Tensor | None = None,
        ve: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (B, T, C). mask: which keys each query sees, (B or 1, 1, T, keys), None for plain causal
        attention. With a kv_cache, the new keys and values are written at cache `slots` (T,) and
        the queries attend over the whole preallocated cache, so shapes never change. ve (B, T, C):
        the value embeddings of these tokens (config.value_embeds), mixed into the values before they
        are cached."""
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        if ve is not None:
            v = self.ve_mix[0] * v + self.ve_mix[1] * ve  # (B, T, C)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v, slots)  # (B, nh, max_len, hs)
            if mask is not None and mask.size(-1) < k.size(2):  # the slots filled so far, eagerly
                k, v = k[:, :, : mask.size(-1)], v[:, :, : mask.size(-1)]
        y = flex.attend(  # F.scaled_dot_product_attention, or FlexAttention for a BlockMask
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=mask is None and T > 1,
        )  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y))


# ----------------------------------------------------------------------------- feed-forward


class SwiGLU(nn.Module):
    """silu(x W_gate) * (x W_up), projected back: the FFN of PaLM and Llama."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.c_fc = Linear(config.n_embd, 2 * config.hidden_dim, bias=config.bias)  # gate and up, fused
        self.c_proj = Linear(config.hidden_dim, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # self.c_proj(F.silu(gate) * up) with gate, up = self.c_fc(x).chunk(2, dim=-1), keeping less
        # for the backward (gpt/model/swiglu.py)
        return self.dropout(swiglu_projection(self.c_fc(x), self.c_proj.weight, self.c_proj.bias))


class GeluMLP(nn.Module):
    """The GPT-2 MLP: Linear -> GELU (tanh approximation) -> Linear; with ffn=relu2, relu(x)**2 in
    place of the GELU (So et al., 2021, "Primer"; the modded-nanogpt speedrun)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.c_fc = Linear(config.n_embd, config.hidden_dim, bias=config.bias)
        self.c_proj = Linear(config.hidden_dim, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)
        self.relu2 = config.ffn == "relu2"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c_fc(x)
        h = F.relu(h).square() if self.relu2 else F.gelu(h, approximate="tanh")
        return self.dropout(self.c_proj(h))


# ----------------------------------------------------------------------------- block


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = make_norm(config)
        self.mlp = SwiGLU(config) if config.ffn == "swiglu" else GeluMLP(config)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        kv_cache: KVCache | None = None,
        mask: torch.Tensor | None = None,
        slots: torch.Tensor | None = None,
        ve: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), rope, kv_cache, mask, slots, ve)
        return x + self.mlp(self.ln_2(x))

    def residual_projections(self) -> tuple[nn.Linear, ...]:
        """The layers that write into the residual stream (scaled down at init)."""
        return (self.attn.c_proj, self.mlp.c_proj)


def scale_residual_projections(blocks: Iterable[nn.Module], std: float, zero: bool = False) -> None:
    """GPT-2's init of the projections that write into a stack's residual stream: N(0, std / sqrt(n))
    for n such writes in the stack (2 per block, attention and FFN; 3 with cross-attention), so that
    the stream's variance does not grow with depth. zero (config.zero_init_proj): all zero instead."""
    projections = [proj for block in blocks for proj in block.residual_projections()]
    for proj in projections:
        if zero:
            nn.init.zeros_(proj.weight)
        else:
            nn.init.normal_(proj.weight, mean=0.0, std=std / math.sqrt(len(projections)))


# Learned position tables (counted apart by num_params): the decoder's, and an encoder's.
LEARNED_POSITIONS = ("wpe.weight", "enc_wpe.weight")


# ----------------------------------------------------------------------------- GPT


class GPT(nn.Module):
    block_class: type[nn.Module] = Block  # the encoder-decoder's decoder: blocks with cross-attention

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if config.vocab_size is None:
            raise ValueError("ModelConfig.vocab_size must be set (from the tokenizer) before building a GPT")
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        if config.value_embeds:
            self.wve = nn.Embedding(config.vocab_size, config.n_embd)  # shared by every layer's values
        if config.pos_emb == "learned":
            self.wpe = nn.Embedding(config.block_size, config.n_embd)
        elif config.pos_emb == "sinusoidal":
            # Derived from the config, so not saved in the state dict.
            self.register_buffer("wpe", sinusoidal_table(config.block_size, config.n_embd), persistent=False)
        else:
            cos, sin = rope_tables(config.block_size, config.head_dim, config.rope_base)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList(self.block_class(config, i) for i in range(config.n_layer))
        self.ln_f = make_norm(config)
        self.lm_head = Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        self.init_weights()

    def init_weights(self) -> None:
        """Every init rule in one place (GPT-2's): N(0, 0.02) for weights and embeddings, zero
        biases, unit norms, and N(0, 0.02 / sqrt(2 * n_layer)) for the projections that write into
        the residual stream (scale_residual_projections), or zero with config.zero_init_proj. Value
        embeddings' mixes start at (0.5, 0.5), as in modded-nanogpt."""
        std = self.config.init_std
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
            if isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
                module.reset_parameters()
            if isinstance(module, CausalSelfAttention) and hasattr(module, "ve_mix"):
                nn.init.constant_(module.ve_mix, 0.5)
        scale_residual_projections(self.h, std, self.config.zero_init_proj)

    def num_params(self, exclude_positions: bool = True) -> int:
        """Parameter count, shared (tied) weights counted once; by default without learned positions."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_positions and self.config.pos_emb == "learned":
            n -= sum(p.numel() for name, p in self.named_parameters() if name in LEARNED_POSITIONS)
        return n

    def embed(
        self,
        idx: torch.Tensor,
        positions: torch.Tensor,
        wte: nn.Embedding,
        wpe: nn.Module | torch.Tensor | None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """Token embeddings (B, T, C) with positions (T,) or (B, T) added (learned: wpe, an
        nn.Embedding; sinusoidal: wpe, the table), or with the rotary tables for them (rope)."""
        x = wte(idx)  # (B, T, C)
        rope = None
        if self.config.pos_emb == "learned":
            x = x + wpe(positions)
        elif self.config.pos_emb == "sinusoidal":
            x = x + wpe[positions].to(x.dtype)
        else:
            cos, sin = self.rope_cos[positions], self.rope_sin[positions]  # (T, hs) | (B, T, hs)
            if positions.dim() == 2:
                cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, hs): the same for every head
            rope = (cos, sin)
        return x, rope

    def forward(
        self,
        idx: torch.Tensor,
        kv_cache: KVCache | None = None,
        pad: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        segments: torch.Tensor | None = None,
        prefix: torch.Tensor | None = None,
        return_hidden: bool = False,
        cross: Any = None,
    ) -> torch.Tensor:
        """idx: (B, T) token ids -> logits (B, T, vocab_size), or with return_hidden the final
        hidden states (B, T, n_embd) after ln_f, before lm_head (for gpt.model.loss, which applies
        lm_head.weight chunk by chunk).

        With a kv_cache, idx holds the tokens after the `kv_cache.pos` already cached ones; the
        cache is advanced by T when the forward is done. pad (B,): how many leading positions of
        each row are left padding (counted from the start of the cache, or of idx without one).
        Padding is never attended to and each row's positions start after its padding, so a row
        computes what it would alone. Training on text calls model(idx): plain causal attention.

        Packed rows (training on examples): positions (B, T), each token's position within its
        own example, and segments (B, T), which example of the row it belongs to (padding -1): a
        token attends only to the tokens before it in its own segment, so each example computes
        what it would alone. prefix (B, T), bool, is used only when config.prefix_lm (so a batch
        can be passed as it comes): prefix tokens also attend to the later prefix tokens of their
        segment (a bidirectional prompt). With a kv_cache the prefix must come whole in the first
        forward (the prefill): later forwards cannot change what cached tokens saw.

        cross: what the decoder blocks of an encoder-decoder attend to; its forward
        (gpt/model/encoder_decoder.py) passes it, a decoder-only model never does.
        """
        B, T = idx.shape
        if not self.config.prefix_lm:
            prefix = None
        if segments is not None and (positions is None or kv_cache is not None):
            raise ValueError("segments (packed rows) need positions and cannot be used with a kv_cache")
        block = self.config.block_size
        slots = torch.arange(T, device=idx.device)  # (T,) where these tokens sit in the sequence
        if kv_cache is not None:
            # A tensor offset, not a Python int, so a compiled decode step serves every position.
            slots = slots + kv_cache.pos
        if not torch.compiler.is_compiling():  # reading the cache position would be a graph break
            end = T if kv_cache is None else int(kv_cache.pos) + T
            if end > block:
                raise ValueError(f"sequence length {end} exceeds block_size {block}")
            if kv_cache is not None and end > kv_cache.max_len:
                raise ValueError(f"sequence length {end} exceeds the KV cache length {kv_cache.max_len}")
            if kv_cache is not None and prefix is not None and end != T:
                raise ValueError("a prefix must be run in the first forward of a KV cache (the prefill)")

        if positions is None:  # (T,), or (B, T) when each row starts after its padding
            positions = slots if pad is None else (slots[None, :] - pad[:, None]).clamp(min=0)
        x, rope = self.embed(idx, positions, self.wte, getattr(self, "wpe", None))  # (B, T, C)
        mask = None  # plain causal attention: SDPA's is_causal fast path
        dropout = self.config.dropout if self.training else 0.0
        if flex.applies(idx, self.config.head_dim, segments, (kv_cache, pad, prefix), dropout):
            mask = flex.document_block_mask(segments)  # CUDA, compiled: gpt/model/flex.py
        elif kv_cache is not None or pad is not None or segments is not None or prefix is not None:
            n_keys = T
            if kv_cache is not None:
                # Eagerly, attention reads the slots filled so far; compiled, the whole cache (masked),
                # so that shapes never change.
                n_keys = kv_cache.max_len if torch.compiler.is_compiling() else end
            mask = attention_mask(slots, n_keys, pad, segments, prefix)
        x = self.drop(x)
        extra: dict[str, Any] = {}
        if cross is not None:  # what an encoder-decoder's decoder blocks attend to
            extra = {"cross": cross}
        elif self.config.value_embeds:
            extra = {"ve": self.wve(idx)}  # (B, T, C), mixed into every layer's attention values
        for block in self.h:
            x = block(x, rope, kv_cache, mask, slots, **extra)
        if kv_cache is not None:
            kv_cache.advance(T)
        x = self.ln_f(x)  # (B, T, C)
        if return_hidden:
            return x
        return soft_cap(self.lm_head(x), self.config.logit_softcap)  # (B, T, vocab_size)
