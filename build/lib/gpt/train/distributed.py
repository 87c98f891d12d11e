"""Strategy factories for configs (Hydra builds them through `_target_`)."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.strategies import FSDPStrategy

from gpt.model.transformer import Block


def fsdp_strategy(activation_checkpointing: bool = False, **kwargs: Any) -> FSDPStrategy:
    """FSDP that shards each transformer block as its own unit.

    A plain `strategy=fsdp` wraps the whole model as one unit, so every forward gathers all of
    it at once; per-block units keep only one block's full weights in memory at a time.
    Activation checkpointing recomputes each block's activations in the backward pass.
    """
    if activation_checkpointing:
        kwargs["activation_checkpointing_policy"] = {Block}
    return FSDPStrategy(auto_wrap_policy={Block}, **kwargs)
