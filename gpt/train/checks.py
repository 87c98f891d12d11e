"""Checks and decisions made before fitting, without Lightning: trainer arguments, devices, gradient
accumulation, validation windows, TF32."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable

import torch

from gpt.data.windows import FULL_VAL_WINDOWS
from gpt.errors import ConfigError


def _int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(v: object) -> bool:
    return _int(v) or isinstance(v, float)


def _flag(v: object) -> bool:
    return isinstance(v, bool)


def _duration(v: object) -> bool:  # Lightning's "DD:HH:MM:SS", or timedelta's keyword arguments
    return isinstance(v, dict) or isinstance(v, str) and re.fullmatch(r"\d+:\d+:\d+:\d+", v) is not None


def _devices(v: object) -> bool:  # a count, -1 (all), auto, or device indices: [0, 1] or "0,1"
    if isinstance(v, list):
        return all(_int(i) for i in v)
    return _int(v) or isinstance(v, str) and re.fullmatch(r"auto|-?\d+|\d+(,\d*)+", v) is not None


# The Trainer arguments users set on the command line, what Lightning accepts for each, and whether
# it takes null. Checked before Lightning is imported: Trainer() would refuse a wrong type only
# seconds later, with a TypeError from deep inside Lightning.
TRAINER_ARGS: dict[str, tuple[Callable[[object], bool], str, bool]] = {
    "accelerator": (lambda v: isinstance(v, str), "a name such as auto, cpu or gpu", False),
    "devices": (_devices, "a number of devices, -1 (all), auto, or a list of device indices", False),
    "num_nodes": (_int, "an integer", False),
    "precision": (lambda v: isinstance(v, str) or _int(v), "a name such as 32-true or bf16-mixed", True),
    "max_steps": (_int, "an integer (-1: no limit)", False),
    "min_steps": (_int, "an integer", True),
    "max_epochs": (_int, "an integer (-1: no limit)", True),
    "max_time": (_duration, "a duration 'DD:HH:MM:SS'", True),
    "val_check_interval": (
        lambda v: _number(v) or _duration(v),
        "a number of steps (an integer), a fraction of the epoch (a float) or a duration 'DD:HH:MM:SS'",
        True,
    ),
    "check_val_every_n_epoch": (_int, "an integer", True),
    "num_sanity_val_steps": (_int, "an integer", True),
    "limit_train_batches": (_number, "a number of batches (an integer) or a fraction (a float)", True),
    "limit_val_batches": (_number, "a number of batches (an integer) or a fraction (a float)", True),
    "log_every_n_steps": (_int, "an integer", True),
    "accumulate_grad_batches": (_int, "an integer", False),
    "gradient_clip_val": (_number, "a number", True),
    "gradient_clip_algorithm": (lambda v: v in ("norm", "value"), "norm or value", True),
    "deterministic": (lambda v: isinstance(v, bool) or v == "warn", "true, false or warn", True),
    "benchmark": (_flag, "true or false", True),
    "enable_checkpointing": (_flag, "true or false", True),
    "enable_progress_bar": (_flag, "true or false", True),
    "enable_model_summary": (_flag, "true or false", True),
    "use_distributed_sampler": (_flag, "true or false", False),
}


def check_trainer_args(trainer: dict[str, object]) -> None:
    """Refuse a Trainer argument of the wrong type (trainer.max_steps=abc) in one line."""
    for name, (accepts, what, nullable) in TRAINER_ARGS.items():
        if name not in trainer or trainer[name] is None and nullable:
            continue
        value = trainer[name]
        if not accepts(value):
            shown = json.dumps(value) if value is None or isinstance(value, bool) else repr(value)
            raise ConfigError(f"trainer.{name}={shown} must be {what}" + (" (or null)" if nullable else ""))


def check_devices(accelerator: str, devices: int | str | list[int]) -> None:
    """Refuse more devices than this machine has, before anything starts. Lightning refuses missing
    GPUs itself, but only after the data is prepared, and on a CPU it starts as many processes as
    asked (each "device" is a training process)."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if accelerator in ("gpu", "cuda") and gpus == 0:
        raise ConfigError(
            f"trainer.accelerator={accelerator} but torch finds no CUDA GPU on this machine; "
            "use trainer.accelerator=cpu or auto"
        )
    if not isinstance(devices, int) or isinstance(devices, bool) or devices < 1:
        return  # "auto", -1 and lists of device ids are Lightning's to check
    on_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and gpus > 0)
    if on_gpu and devices > gpus:
        raise ConfigError(
            f"trainer.devices={devices} but this machine has {gpus} CUDA GPU(s); "
            f"use trainer.devices={gpus} or fewer (devices per node)"
        )
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if accelerator in ("cpu", "auto") and not on_gpu and devices > cores:
        raise ConfigError(
            f"trainer.devices={devices} on CPU but this process may use {cores} CPU core(s); each device "
            f"is a training process: use trainer.devices={cores} or fewer"
        )


def accumulation_steps(tokens_per_step: int, micro_batch: int, block_size: int, world_size: int) -> int:
    """Micro-batches each device accumulates so one optimizer step sees tokens_per_step tokens."""
    per_pass = micro_batch * block_size * world_size
    if tokens_per_step % per_pass:
        raise ConfigError(
            f"tokens_per_step={tokens_per_step} is not a multiple of data.batch_size x model.block_size x "
            f"devices x nodes = {micro_batch} x {block_size} x {world_size} = {per_pass}; pick a multiple"
        )
    return tokens_per_step // per_pass


CPU_VAL_WINDOWS = 64
LARGE_VOCAB = 4096


def val_windows(requested: int | None, device: str, vocab_size: int) -> tuple[int, str | None]:
    """(windows per validation, a line saying why) for data.val_windows; null picks by cost."""
    if requested is not None:
        return requested, None
    if device != "cpu" or vocab_size <= LARGE_VOCAB:
        return FULL_VAL_WINDOWS, None
    slower = FULL_VAL_WINDOWS // CPU_VAL_WINDOWS
    return CPU_VAL_WINDOWS, (
        f"validation: {CPU_VAL_WINDOWS} windows (data.val_windows=null on a CPU with a {vocab_size:,}-token "
        f"vocabulary; data.val_windows={FULL_VAL_WINDOWS} scores the full set, {slower}x slower)"
    )


def enable_tf32() -> None:
    """TF32 matmuls on Ampere and newer GPUs: fp32 training several times faster, ~10 mantissa bits."""
    if torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")
