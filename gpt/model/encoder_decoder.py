"""The encoder-decoder Transformer of "Attention Is All You Need", built from this project's parts.

The encoder reads the source (a pair's prompt) both ways: n_enc_layer pre-norm blocks of
bidirectional self-attention and FFN, and a final norm. The decoder writes the target (the
completion) one token at a time: pre-norm blocks of causal self-attention, cross-attention to the
encoder's output, and FFN, then the final norm and the LM head. The norm, FFN and positions are the
model config's, as in the decoder-only GPT (gpt/model/transformer.py), whose embedding, blocks and
forward this reuses: positions go into the encoder's and the decoder's own self-attention (rotary:
queries and keys), never into cross-attention. With tie_embeddings one matrix is the encoder's
input embedding, the decoder's and the LM head, as in the paper (section 3.4).

Sources and targets are batched the way the decoder-only model batches text: left padded rows
(`pad`, generation) or packed rows of several examples (`positions`, `segments`, training), where
each example's target attends only to its own source. A query never sees padding.

Generation encodes a source once: `encode_into` stores each decoder layer's cross-attention keys
and values, and which source slots are real, in the KV cache (gpt/model/kv_cache.py), beside the
decoder's self-attention cache; every decoder step then reads them from there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from gpt.config import ModelConfig
from gpt.model.kv_cache import KVCache
from gpt.model.linear import Linear
from gpt.model.transformer import (
    GPT,
    Block,
    CausalSelfAttention,
    GeluMLP,
    SwiGLU,
    make_norm,
    scale_residual_projections,
)


@dataclass
class Cross:
    """What the decoder's cross-attention reads. memory: the encoder's output (B, S, C), from which
    each layer computes its keys and values; None when the KV cache holds them. mask: which source
    slots each decoder query sees, (B, 1, T or 1, S) bool."""

    memory: torch.Tensor | None
    mask: torch.Tensor


def source_masks(
    n_source: int,
    device: torch.device,
    pad: torch.Tensor | None = None,
    segments: torch.Tensor | None = None,
    target_segments: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(the encoder's self-attention mask (B, 1, S, S), the decoder's cross-attention mask (B, 1, T
    or 1, S)), bool, for a source of n_source slots: left padded (pad (B,), generation) or packed
    (segments (B, S) and target_segments (B, T), padding -1, training). None where nothing is masked.

    A real query sees the real slots of its own example. Padding queries see the padding slots
    (encoder) or every slot (decoder): no row of a softmax is ever empty, which would give NaN."""
    if segments is not None:
        self_mask = segments[:, :, None] == segments[:, None, :]  # (B, S, S); padding -1 sees padding
        cross_mask = (target_segments[:, :, None] == segments[:, None, :]) | (target_segments < 0)[:, :, None]
        return self_mask[:, None], cross_mask[:, None]  # (B, 1, S, S), (B, 1, T, S)
    if pad is None:
        return None, None
    keys = torch.arange(n_source, device=device)[None, :]  # (1, S)
    real = keys >= pad[:, None]  # (B, S)
    self_mask = real[:, None, :] | (keys[:, :, None] == keys[:, None, :])  # (B, S, S): padding sees itself
    return self_mask[:, None], real[:, None, None, :]  # (B, 1, S, S), (B, 1, 1, S)


class CrossAttention(nn.Module):
    """Queries from the decoder, keys and values from the encoder's output; no positions."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.head_dim = config.head_dim
        self.dropout = config.dropout
        self.c_q = Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.c_kv = Linear(config.n_embd, 2 * config.n_embd, bias=config.bias)  # keys and values, fused
        self.c_proj = Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.qk_norm = config.qk_norm
        if config.qk_norm:  # as in self-attention
            self.q_norm = nn.RMSNorm(config.head_dim, eps=config.norm_eps)
            self.k_norm = nn.RMSNorm(config.head_dim, eps=config.norm_eps)

    def keys_values(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """memory (B, S, C) -> keys, values, each (B, nh, S, hs)."""
        B, S, C = memory.shape
        k, v = self.c_kv(memory).split(C, dim=2)
        k = k.view(B, S, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, S, hs)
        v = v.view(B, S, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, S, hs)
        return (self.k_norm(k) if self.qk_norm else k), v

    def forward(
        self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """x (B, T, C); k, v (B, nh, S, hs); mask (B, 1, T or 1, S) bool or None -> (B, T, C)."""
        B, T, C = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        if self.qk_norm:
            q = self.q_norm(q)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0
        )  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class DecoderBlock(nn.Module):
    """Pre-norm: causal self-attention, cross-attention to the source, FFN, each added to the stream."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.ln_1 = make_norm(config)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_cross = make_norm(config)
        self.cross_attn = CrossAttention(config)
        self.ln_2 = make_norm(config)
        self.mlp = SwiGLU(config) if config.ffn == "swiglu" else GeluMLP(config)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        kv_cache: KVCache | None,
        mask: torch.Tensor | None,
        slots: torch.Tensor | None,
        cross: Cross,
    ) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), rope, kv_cache, mask, slots)
        if cross.memory is None:  # generation: the source's keys and values were cached once
            k, v = kv_cache.cross_k[self.layer_idx], kv_cache.cross_v[self.layer_idx]
        else:
            k, v = self.cross_attn.keys_values(cross.memory)
        x = x + self.cross_attn(self.ln_cross(x), k, v, cross.mask)
        return x + self.mlp(self.ln_2(x))

    def residual_projections(self) -> tuple[nn.Linear, ...]:
        return (self.attn.c_proj, self.cross_attn.c_proj, self.mlp.c_proj)


class EncoderDecoder(GPT):
    """GPT's embedding, decoder stack (of DecoderBlocks), final norm and LM head, plus an encoder:
    enc_h (n_enc_layer Blocks, attending both ways), enc_ln_f, and with learned positions enc_wpe;
    enc_wte only when tie_embeddings is off (else the encoder reads wte)."""

    block_class = DecoderBlock

    def __init__(self, config: ModelConfig) -> None:
        if config.decoder_start is None:
            raise ValueError(
                "ModelConfig.decoder_start must be set (the end-of-text token) for an encoder_decoder"
            )
        super().__init__(config)
        if not config.tie_embeddings:
            self.enc_wte = nn.Embedding(config.vocab_size, config.n_embd)
        if config.pos_emb == "learned":
            self.enc_wpe = nn.Embedding(config.block_size, config.n_embd)
        self.enc_h = nn.ModuleList(Block(config, i) for i in range(config.encoder_layers))
        self.enc_ln_f = make_norm(config)
        self.init_weights()  # again, now that the encoder exists: the same rules for every weight

    def init_weights(self) -> None:
        super().init_weights()
        if hasattr(self, "enc_h"):  # not yet when GPT.__init__ calls this
            scale_residual_projections(self.enc_h, self.config.init_std, self.config.zero_init_proj)

    def encode(
        self,
        source: torch.Tensor,
        pad: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        segments: torch.Tensor | None = None,
        self_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The encoder's output (B, S, C) for source (B, S) token ids, left padded by pad (B,) or
        packed (positions, segments (B, S)); self_mask: source_masks' first."""
        S = source.size(1)
        if positions is None:
            slots = torch.arange(S, device=source.device)
            positions = slots if pad is None else (slots[None, :] - pad[:, None]).clamp(min=0)
        if self.config.block_size < S:
            raise ValueError(f"source length {S} exceeds block_size {self.config.block_size}")
        wte = getattr(self, "enc_wte", self.wte)
        wpe = self.enc_wpe if self.config.pos_emb == "learned" else getattr(self, "wpe", None)
        x, rope = self.embed(source, positions, wte, wpe)  # (B, S, C)
        x = self.drop(x)
        # Both ways: a source without padding gets an all-true mask (without one, attention is causal).
        mask = torch.ones(1, 1, S, S, dtype=torch.bool, device=x.device) if self_mask is None else self_mask
        for block in self.enc_h:
            x = block(x, rope, None, mask)
        return self.enc_ln_f(x)  # (B, S, C)

    def encode_into(
        self, kv_cache: KVCache, source: torch.Tensor, source_pad: torch.Tensor | None = None
    ) -> None:
        """Encode source (B, S), left padded by source_pad (B,), and store in kv_cache what every decoder
        step reads of it: each layer's cross-attention keys and values, and the real slots."""
        self_mask, cross_mask = source_masks(source.size(1), source.device, source_pad)
        memory = self.encode(source, source_pad, self_mask=self_mask)
        kv = [block.cross_attn.keys_values(memory) for block in self.h]
        if cross_mask is None:
            cross_mask = torch.ones(
                source.size(0), 1, 1, source.size(1), dtype=torch.bool, device=source.device
            )
        kv_cache.set_source([k for k, _ in kv], [v for _, v in kv], cross_mask)

    def forward(
        self,
        idx: torch.Tensor,
        kv_cache: KVCache | None = None,
        pad: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        segments: torch.Tensor | None = None,
        prefix: torch.Tensor | None = None,
        return_hidden: bool = False,
        source: torch.Tensor | None = None,
        source_pad: torch.Tensor | None = None,
        source_positions: torch.Tensor | None = None,
        source_segments: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The decoder's logits (B, T, vocab_size) (or hidden states) for target tokens idx (B, T),
        with GPT.forward's arguments for the decoder side, and the source: token ids (B, S), left
        padded by source_pad (B,), or packed (source_positions, source_segments (B, S), with
        `segments` on the target side saying which example each target token belongs to). Without
        a source, the KV cache must hold one (encode_into)."""
        if source is None:
            if kv_cache is None or not kv_cache.cross_k:
                raise ValueError(
                    "an encoder_decoder needs a source, or a KV cache that holds one (encode_into)"
                )
            cross = Cross(None, kv_cache.cross_mask)
        else:
            self_mask, cross_mask = source_masks(
                source.size(1), source.device, source_pad, source_segments, segments
            )
            memory = self.encode(source, source_pad, source_positions, source_segments, self_mask)
            cross = Cross(memory, cross_mask)
        return super().forward(idx, kv_cache, pad, positions, segments, None, return_hidden, cross)


def build_model(config: ModelConfig) -> GPT:
    """The model config's architecture: GPT (decoder-only) or EncoderDecoder."""
    return EncoderDecoder(config) if config.arch == "encoder_decoder" else GPT(config)
