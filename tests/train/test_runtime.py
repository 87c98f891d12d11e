"""gpt.train.runtime: freed memory kept for reuse, so that reallocating it does not fault pages in again."""

import os
import subprocess
import sys

import pytest

from gpt.train.runtime import USER_SETTINGS

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")

# Training steps of a small model (forward and backward, the activations and gradients allocated
# and freed every step); prints whether the thresholds were set and the page faults per step.
STEPS = """
import resource, sys, torch
from gpt.config import ModelConfig
from gpt.train.runtime import keep_freed_memory
from gpt.model.transformer import GPT
applied = keep_freed_memory() if sys.argv[1] == "keep" else None
torch.manual_seed(0)
model = GPT(ModelConfig(n_layer=2, n_head=4, n_embd=128, block_size=64, vocab_size=65))
x = torch.randint(0, 65, (16, 64))
def step():
    model(x).logsumexp(-1).mean().backward()
    model.zero_grad(set_to_none=True)
for _ in range(3):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print(applied, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 10)
"""


def run_loop(mode: str, **env: str) -> tuple[str, int]:
    clean = {k: v for k, v in os.environ.items() if k not in USER_SETTINGS}
    out = subprocess.run(
        [sys.executable, "-c", STEPS, mode], env=clean | env, capture_output=True, text=True, check=True
    ).stdout.split()
    return out[0], int(out[1])


@linux
def test_kept_memory_is_reused_without_page_faults():
    applied, faults = run_loop("keep")
    _, default_faults = run_loop("default")
    assert applied == "True"
    # glibc's defaults: about 1,500 faults a step here (2-core VM, 1 or 2 threads); kept: about 30
    assert default_faults > 500
    assert faults < default_faults / 10


@linux
def test_the_users_own_malloc_settings_stand():
    applied, faults = run_loop("keep", MALLOC_TRIM_THRESHOLD_="1048576")
    assert applied == "False"
