"""Which precision this hardware computes fast: what trainer.precision=auto becomes, and the
dtype of Muon's Newton-Schulz iteration.

bf16 is not fast everywhere. GPUs from Ampere (compute capability 8.0) on compute it natively.
On a CPU it depends on the instruction set: with AVX-512 BF16 or AMX a bf16 matmul is faster than
fp32, but on AVX2-only CPUs (most laptops and many cloud machines) oneDNN emulates it, 20 to 200
times slower than fp32. The CPU's flags do not tell the whole story (ONEDNN_MAX_CPU_ISA, a VM that
hides flags), so on a CPU the answer is measured: one 256 x 256 matmul in each dtype, on one thread
so that other busy cores do not skew it; a few milliseconds, once per process.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import torch

from gpt.errors import ConfigError

# A bf16 matmul taking more than this many times as long as fp32 counts as emulated. Measured
# here: 0.3x with AVX-512 BF16, 70x to 190x with oneDNN limited to AVX2.
EMULATED_RATIO = 2.0
# Under bf16 autocast on a CPU, every op casts its inputs, and a narrow model's matmuls are too
# small for the bf16 gain to pay for that. Measured with bench/bench_train.py on a 2-core AVX-512
# BF16 CPU: model=nano (128 wide) 66 ms per step in fp32, 88 ms in bf16-mixed; model=small (384
# wide) 1,752 ms in fp32, 1,069 ms in bf16-mixed. So auto picks bf16 on a CPU from this width on.
CPU_BF16_MIN_WIDTH = 256
BF16_PRECISIONS = ("bf16-mixed", "bf16-true", "bf16")
FP16_PRECISIONS = ("16-mixed", "16-true", "16")


@dataclass(frozen=True)
class Bf16Speed:
    fast: bool
    # Why, for the start-up line: "NVIDIA H200 computes bf16 natively", "... on this CPU (AVX2)".
    reason: str
    # bf16 matmul time / fp32 matmul time, where it was measured (CPUs).
    ratio: float | None = None


def _best_time(fn, reps: int = 3) -> float:
    fn()  # the first call pays for kernel selection and allocation
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


@functools.cache
def cpu_bf16_ratio(n: int = 256) -> float:
    """How many times as long an n x n bf16 matmul takes as an fp32 one on this CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        gen = torch.Generator().manual_seed(0)
        a, b = torch.randn(n, n, generator=gen), torch.randn(n, n, generator=gen)
        a16, b16 = a.bfloat16(), b.bfloat16()
        fp32 = _best_time(lambda: a @ b)
        bf16 = _best_time(lambda: a16 @ b16)
    finally:
        torch.set_num_threads(threads)
    return bf16 / max(fp32, 1e-9)


def cpu_kind() -> str:
    """The CPU kind a speed depends on, for benchmark output: ISA torch dispatches to, and bf16."""
    ratio = cpu_bf16_ratio()
    bf16 = "native bf16" if ratio <= EMULATED_RATIO else "emulated bf16"
    return f"{torch.backends.cpu.get_cpu_capability()}, {bf16} (bf16 matmul {ratio:.1f}x fp32 time)"


def device_type(accelerator: str) -> str:
    """The device type Lightning's accelerator setting lands on: cuda, mps, cpu (or another)."""
    if accelerator == "auto":
        if torch.cuda.is_available():
            return "cuda"
        mps = getattr(torch.backends, "mps", None)
        return "mps" if mps is not None and mps.is_available() else "cpu"
    return "cuda" if accelerator == "gpu" else accelerator


@functools.cache
def bf16_speed(device: str) -> Bf16Speed:
    """Whether `device` ("cpu", "cuda", ...) computes bf16 at least as fast as fp32, and why."""
    if device == "cuda":
        name = torch.cuda.get_device_name()
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return Bf16Speed(True, f"{name} computes bf16 natively")
        return Bf16Speed(False, f"{name} has no native bf16")
    if device == "cpu":
        ratio = cpu_bf16_ratio()
        isa = torch.backends.cpu.get_cpu_capability()
        if ratio <= EMULATED_RATIO:
            why = f"bf16 is native on this CPU ({isa}): a matmul took {ratio:.1f}x fp32's time"
            return Bf16Speed(True, why, ratio)
        return Bf16Speed(
            False, f"this CPU ({isa}) emulates bf16: a bf16 matmul took {ratio:.0f}x as long as fp32", ratio
        )
    return Bf16Speed(False, f"bf16 is not measured on {device}")


def resolve_precision(
    requested: str | int, accelerator: str, width: int
) -> tuple[str | int, str | None, str | None]:
    """(precision for Lightning's Trainer, a line to print, a warning) for trainer.precision, for a
    model `width` (n_embd) wide.

    "auto": bf16-mixed where the device computes bf16 fast (on a CPU, for models at least
    CPU_BF16_MIN_WIDTH wide), else 32-true. An explicit bf16 or fp16
    precision on a CPU that emulates bf16 is kept, with a warning that says how slow it is; fp16
    mixed precision on a CPU becomes bf16-mixed, as Lightning would make it (it has no fp16
    autocast on CPUs), but said here.
    """
    device = device_type(accelerator)
    if requested == "auto":
        speed = bf16_speed(device)
        if speed.fast and device == "cpu" and width < CPU_BF16_MIN_WIDTH:
            why = f"{speed.reason}, but at {width} wide fp32 is faster"
            return "32-true", f"precision: 32-true (trainer.precision=auto: {why})", None
        precision = "bf16-mixed" if speed.fast else "32-true"
        return precision, f"precision: {precision} (trainer.precision=auto: {speed.reason})", None
    if not isinstance(requested, (str, int)) or isinstance(requested, bool):
        raise ConfigError(f"trainer.precision={requested!r}: use auto, 32-true, bf16-mixed, 16-mixed, ...")
    precision = requested
    note = None
    if device == "cpu" and str(requested) in ("16-mixed", "16"):
        precision = "bf16-mixed"
        note = f"trainer.precision={requested} on a CPU runs as bf16-mixed (no fp16 autocast on CPUs)"
    if device == "cpu" and str(precision) in BF16_PRECISIONS:
        speed = bf16_speed("cpu")
        if not speed.fast:
            warning = (
                f"trainer.precision={requested} on a CPU that emulates bf16 "
                f"(a bf16 matmul took {speed.ratio:.0f}x as long as fp32 here): "
                "training will be many times slower than with trainer.precision=auto or 32-true"
            )
            return precision, note, warning
    return precision, note, None
