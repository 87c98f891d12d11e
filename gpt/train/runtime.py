"""What train.py sets for its own process: freed memory kept for reuse, and an exit without a last
collection of every object. (generate.py and serve.py do not: their decode steps fault no pages.)

keep_freed_memory, on Linux (glibc's malloc): a CPU training step then stops paying for page faults.
A training step frees and allocates the same activation and gradient tensors every step. With
glibc's defaults, blocks over 128 KiB are mapped fresh from the kernel (mmap) and unmapped when
freed, and the heap's free top is handed back (trimmed); each reuse then faults its pages in again,
one 4 KiB page at a time, ~1,500 faults a step for the nano model on Tiny Shakespeare. Raising the
mmap threshold to glibc's largest (32 MiB on 64-bit) and the trim threshold keeps that memory mapped
in the process. Both are set: glibc's dynamic threshold goes away once either is set, and either one
alone faults more than the defaults. The numbers: docs/design.md, "The process: freed memory kept,
no last collection".

This is what MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=134217728 in the environment
would do, applied from inside the process (glibc reads those only at start-up). PyTorch's CPU
tuning guide suggests swapping in jemalloc or tcmalloc (LD_PRELOAD) for the same reason; this needs
neither a second allocator nor a launcher.
"""

from __future__ import annotations

import ctypes
import gc
import os
import sys

M_TRIM_THRESHOLD = -1  # glibc's malloc.h
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's largest on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX)
TRIM_THRESHOLD = 128 * 1024 * 1024  # freed memory the process keeps at most before trimming
# Set by the user: their choice stands.
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "LD_PRELOAD")


def keep_freed_memory() -> bool:
    """Set glibc's mmap and trim thresholds (above) for this process; whether it did. Nothing happens
    off Linux, without glibc (musl has no mallopt), or when the environment sets any of
    USER_SETTINGS (its own thresholds, or another allocator preloaded)."""
    if not sys.platform.startswith("linux") or any(name in os.environ for name in USER_SETTINGS):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def skip_final_collection() -> None:
    """Let the interpreter exit without a last garbage collection over everything imported.

    At exit Python tears down its modules and collects cycles among what is left: with Lightning, torch,
    dynamo and sympy loaded that took 1.4 s of every `python train.py` here (the interpreter's exit
    after importing lightning.pytorch, 2-core VM), 0.2 s with the objects frozen (gc.freeze) first.
    At-exit handlers still run (logging's flush, wandb's finish) and files still close; only garbage
    cycles left at exit are not collected (their memory goes back to the system with the process).
    """
    gc.freeze()
