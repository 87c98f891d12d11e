"""What every benchmark result carries: the machine it ran on, with the CPU kind a CPU speed depends
on (the instruction set torch dispatches to, and whether bf16 is native or emulated)."""

from __future__ import annotations

import os
import platform

import torch

from gpt.train.precision import cpu_kind


def describe() -> dict[str, object]:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": platform.processor() or platform.machine(),
        "cpu_kind": cpu_kind(),
        "cpus": cpus,
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def summary(machine: dict[str, object]) -> str:
    """One line: the GPU, or the CPU with its kind and threads."""
    cpu = f"{machine['cpu']}, {machine['cpu_kind']}, {machine['torch_threads']} threads"
    return f"{machine['gpu']} (host: {cpu})" if machine["gpu"] else cpu
