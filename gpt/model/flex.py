"""FlexAttention for rows of several documents (data.doc_mask, packed pairs) on CUDA under torch.compile.

The dense mask of `attention_mask` costs B*T*T bytes and runs the memory-efficient kernel over every
tile of the scores, also the tiles a document-causal mask blanks out entirely. FlexAttention's block
mask lists, per 128 x 128 tile, whether it is empty, full or partial, and its kernel skips the empty
ones: with documents of a few hundred tokens in a window of a few thousand, most tiles. It is fast
only compiled (eager, it materializes the scores), has no dropout, and needs torch 2.5; so GPT.forward
takes it only where `applies` says so, and the dense mask everywhere else (docs/design.md,
"Attention masks"). `attend` is F.scaled_dot_product_attention for either kind of mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:  # torch 2.5 and later
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
except ImportError:  # pragma: no cover
    BlockMask = create_block_mask = flex_attention = None


def applies(
    idx: torch.Tensor,
    head_dim: int,
    segments: torch.Tensor | None,
    others: tuple[torch.Tensor | None, ...],
    dropout: float,
) -> bool:
    """Whether a forward over idx takes FlexAttention: a mask made of segments alone (`others`, the
    KV cache, padding and prefix, all None), on CUDA, inside torch.compile, without attention
    dropout, at a head size of a power of two from 16 (the shapes its kernels are tuned for)."""
    return (
        flex_attention is not None
        and segments is not None
        and all(other is None for other in others)
        and idx.is_cuda
        and torch.compiler.is_compiling()
        and dropout == 0.0
        and head_dim >= 16
        and head_dim & (head_dim - 1) == 0
    )


def document_block_mask(segments: torch.Tensor) -> BlockMask:
    """The block mask of `attention_mask(slots, T, segments=segments)`: a query sees the keys at or
    before it in its own segment. segments (B, T)."""
    B, T = segments.shape

    def document_causal(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        return (kv <= q) & (segments[b, q] == segments[b, kv])

    return create_block_mask(document_causal, B, None, T, T, device=segments.device)


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | BlockMask | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
) -> torch.Tensor:
    """F.scaled_dot_product_attention, or flex_attention where attn_mask is a BlockMask (applies()
    ruled out dropout there). q, k, v (B, nh, T, hs) -> (B, nh, T, hs)."""
    if BlockMask is not None and isinstance(attn_mask, BlockMask):
        return flex_attention(q, k, v, block_mask=attn_mask)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal
    )
