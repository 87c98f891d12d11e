"""Strategy factories for configs (Hydra builds them through `_target_`)."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

from gpt.model.transformer import Block


def fsdp_strategy(activation_checkpointing: bool = False, **kwargs: Any) -> FSDPStrategy:
    """FSDP that shards each transformer block as its own unit.

    A plain `strategy=fsdp` wraps the whole model as one unit, so every forward gathers all of
    it at once; per-block units keep only one block's full weights in memory at a time.
    Activation checkpointing recomputes each block's activations in the backward pass.
    GPUs only: Lightning refuses FSDPStrategy without a CUDA accelerator, and torch's FSDP1 itself
    needs an accelerator device. `fsdp2_strategy` runs on CPU too.
    """
    if activation_checkpointing:
        kwargs["activation_checkpointing_policy"] = {Block}
    return FSDPStrategy(auto_wrap_policy={Block}, **kwargs)


class FullyShardedStrategy(ModelParallelStrategy):
    """Lightning's ModelParallelStrategy as plain FSDP2: every process is one data-parallel shard
    (no tensor parallelism), and checkpoints are one file with the full state dict, gathered on
    rank 0, as with DDP. GPTLitModule.configure_model applies `fully_shard` to each block and the
    model. Runs on CPU (gloo) as well as on GPUs (nccl)."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("save_distributed_checkpoint", False)
        super().__init__(tensor_parallel_size=1, **kwargs)

    def setup_environment(self) -> None:
        if self._data_parallel_size == "auto":
            self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()


def fsdp2_strategy(**kwargs: Any) -> FullyShardedStrategy:
    return FullyShardedStrategy(**kwargs)
