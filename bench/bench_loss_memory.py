"""Peak CPU memory of one training step (forward + backward): the plain logits loss and autograd's
SwiGLU, as 0.3.0 computed a step, against the fused chunked loss (gpt/model/loss.py) and the SwiGLU
that recomputes its product (gpt/model/swiglu.py), for model=medium at batch 4 x 1024 by default.

Each variant runs in a fresh subprocess: its peak is ru_maxrss (the process's resident high-water
mark) minus the resident memory after building the model and the batch. "step" variants run the
whole model; "head" variants only the loss on a (B*T, C) hidden-state leaf, to show the logits'
share apart from the transformer's activations.

    python bench/bench_loss_memory.py [--model medium] [--batch 4] [--seq 1024] [--chunks 4096 1024]

Chunk 0 is the default chunk size (gpt.model.loss.default_chunk_size); --chunks adds others.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MB = 2**20


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def autograd_swiglu(gate_up, weight, bias):
    """The SwiGLU product and projection as plain autograd computes them (0.3.0's)."""
    import torch.nn.functional as F

    gate, up = gate_up.chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, weight, bias)


def run_variant(
    model_name: str, batch: int, seq: int, loss: str, chunk: int, head_only: bool, ffn: str
) -> dict:
    """One variant in this process; returns its numbers."""
    import torch
    import torch.nn.functional as F
    from hydra import initialize_config_dir

    from bench.model_presets import model_preset
    from gpt.model import transformer
    from gpt.model.loss import fused_linear_cross_entropy
    from gpt.model.transformer import GPT

    if ffn == "autograd":
        transformer.swiglu_projection = autograd_swiglu

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        config = model_preset(model_name)
    config.vocab_size = 50257
    torch.manual_seed(0)
    model = GPT(config).train()
    idx = torch.randint(0, config.vocab_size, (batch, seq))
    targets = torch.randint(0, config.vocab_size, (batch, seq))
    hidden_leaf = torch.randn(batch * seq, config.n_embd, requires_grad=True) if head_only else None
    base = rss_bytes()
    start = time.perf_counter()
    # (B*T, C): a leaf for the head alone, else the model's final hidden states
    hidden = hidden_leaf if head_only else model(idx, return_hidden=True).flatten(0, 1)
    if loss == "plain":
        logits = model.lm_head(hidden)
        value = F.cross_entropy(logits.float(), targets.flatten(), reduction="sum")
    else:
        value = fused_linear_cross_entropy(
            hidden, model.lm_head.weight, targets.flatten(), chunk_size=chunk or None
        )
    value.backward()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return {"peak_mb": (peak - base) / MB, "base_mb": base / MB, "seconds": seconds, "loss": value.item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="medium")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--chunks", type=int, nargs="*", default=[])
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # internal: run one variant, print JSON
    args = parser.parse_args()
    if args.variant:
        part, loss, chunk, ffn = args.variant.split(":")
        out = run_variant(args.model, args.batch, args.seq, loss, int(chunk), part == "head", ffn)
        print(json.dumps(out))
        return

    from gpt.model.loss import default_chunk_size

    v = 50257
    logits_mb = args.batch * args.seq * v * 4 / MB
    shape = f"model={args.model} batch {args.batch} x {args.seq}"
    chunk = default_chunk_size(v)
    print(f"{shape}, one fp32 copy of the logits: {logits_mb:.0f} MB; default chunk {chunk} tokens")
    chunks = [0, *args.chunks]
    variants = [("head", "plain", 0, "lean")] + [("head", "fused", c, "lean") for c in chunks]
    variants += [("step", "plain", 0, "autograd"), ("step", "plain", 0, "lean")]
    variants += [("step", "fused", c, ffn) for c in chunks for ffn in ("autograd", "lean")]
    results = {}
    for part, loss, chunk, ffn in variants:
        cmd = [sys.executable, __file__, "--model", args.model, "--batch", str(args.batch)]
        cmd += ["--seq", str(args.seq), "--variant", f"{part}:{loss}:{chunk}:{ffn}"]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        baseline = results.setdefault(part, r)  # the first of each part: plain logits (and SwiGLU)
        name = "plain logits" if loss == "plain" else f"fused, chunk {chunk or default_chunk_size(v)}"
        if part == "step":
            name += ", SwiGLU " + ("autograd" if ffn == "autograd" else "recomputed")
        ratio = baseline["peak_mb"] / r["peak_mb"]
        vs = "" if r is baseline else f"{ratio:4.2f}x lower than the first {part} row"
        print(
            f"{part:4s} {name:40s} peak +{r['peak_mb']:6.0f} MB over {r['base_mb']:5.0f} MB "
            f"{r['seconds']:6.1f} s  loss {r['loss']:.2f}  {vs}"
        )


if __name__ == "__main__":
    main()
