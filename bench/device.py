"""The stages of bench/device.sh, each in its own process with its own timeout; one JSON and a table.

    python bench/device.py --out DIR            # on a GPU (bench/device.sh sets up the environment)
    python bench/device.py --dry-run --out DIR  # on a CPU: tiny shapes, the same JSON keys

A stage that fails or runs out of time is recorded as such ("ok": false, "error") and the next one
runs. The stage processes are this file again with --stage NAME.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

PEAK_BF16 = 989e12  # H100 SXM / H200 dense bf16, FLOP/s
VAL_TARGET = 1.47
# Seconds each stage may run on the GPU (the caps add up to about 8 minutes; a dry run gets 300 each).
TIMEOUTS = {"matmul": 30, "train": 120, "shakespeare": 150, "generate": 120, "pytest_gpu": 90}


def matmul(dry: bool) -> dict:
    """The device's bf16 matmul rate on random data: the ceiling MFU is read against, besides the peak."""
    cuda = not dry
    n, iters = (8192, 50) if cuda else (256, 5)
    dtype = torch.bfloat16 if cuda else torch.float32
    a, b = (torch.randn(n, n, device="cuda" if cuda else "cpu", dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            a @ b
        end.record()
        torch.cuda.synchronize()
        seconds = start.elapsed_time(end) / 1000
    else:
        t = time.perf_counter()
        for _ in range(iters):
            a @ b
        seconds = time.perf_counter() - t
    return {"n": n, "dtype": str(dtype), "tflops_per_s": 2 * n**3 * iters / seconds / 1e12}


def train(dry: bool) -> dict:
    """model=medium (r50k_base, context 1024) under the Lightning Trainer, bf16-mixed, compiled, fused
    AdamW (gpt.train.optim picks fused for CUDA parameters): tokens/s and model FLOP/s after warm-up."""
    from bench_train import BPE_TOKENIZER, batches, lightning_loop
    from model_presets import model_preset

    from gpt.config import ModelConfig, OptimConfig
    from gpt.model.transformer import GPT
    from gpt.train.lit_module import GPTLitModule

    if dry:
        model_cfg = ModelConfig(n_layer=2, n_head=2, n_embd=64, block_size=64, vocab_size=50257)
        batch, warmup, steps, accelerator, precision = 2, 2, 4, "cpu", "32-true"
    else:
        torch.set_float32_matmul_precision("high")
        model_cfg = replace(model_preset("medium"), vocab_size=50257)
        batch, warmup, steps, accelerator, precision = 16, 10, 50, "gpu", "bf16-mixed"
    torch.manual_seed(0)
    module = GPTLitModule(asdict(model_cfg), asdict(OptimConfig(warmup_steps=10)), BPE_TOKENIZER)
    if not dry:
        module.model.compile()  # as train.py compile=true does
    loader = batches(warmup + steps, batch, model_cfg.block_size, model_cfg.vocab_size)
    dts = lightning_loop(module, loader, warmup + steps, accelerator, precision)[warmup - 1 :]
    optimizer = module.trainer.optimizers[0]
    step = statistics.median(dts)
    tokens = batch * model_cfg.block_size
    n_params = GPT(model_cfg).num_params()
    flops = (6 * n_params + 12 * model_cfg.n_layer * model_cfg.n_embd * model_cfg.block_size) * tokens
    return {
        "model": "tiny" if dry else "medium",
        "params": n_params,
        "batch": f"{batch}x{model_cfg.block_size}",
        "precision": precision,
        "compile": not dry,
        "fused_adamw": bool(optimizer.defaults.get("fused")),
        "steps_timed": len(dts),
        "step_ms": 1000 * step,
        "tokens_per_s": tokens / step,
        "tflops_per_s": flops / step / 1e12,
        "mfu_vs_peak_pct": 100 * flops / step / PEAK_BF16,
        # weights, AdamW state, activations and the fused loss's chunks, at the worst moment
        "peak_memory_gb": torch.cuda.max_memory_allocated() / 1e9 if torch.cuda.is_available() else None,
    }


def shakespeare(dry: bool) -> dict:
    """train.py experiment=shakespeare_char_small compile=true until val/loss <= 1.47: wall seconds from
    the command's start (compilation and data preparation included). Stops the run once there."""
    from gpt.runs.metrics import read_metrics

    run_dir = Path(tempfile.mkdtemp(prefix="device-shakespeare-"))
    if dry:  # the CPU recipe, a few steps, a target a few steps reach
        target = 3.8
        args = ["experiment=shakespeare_char_cpu", "trainer.max_steps=20", "trainer.val_check_interval=10"]
        args += ["+trainer.limit_val_batches=4"]
    else:
        target = VAL_TARGET
        args = ["experiment=shakespeare_char_small", "compile=true"]
    cmd = [sys.executable, str(ROOT / "train.py"), *args, f"hydra.run.dir={run_dir}"]
    cmd += ["callbacks.samples.every_n_steps=0", "callbacks.progress_bar.refresh_rate=0"]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT)
    reached, vals = None, []
    while reached is None and proc.poll() is None:
        time.sleep(0.5)
        vals = [(int(r["step"]), r["val/loss"]) for r in read_metrics(run_dir) if "val/loss" in r]
        reached = next(((s, v) for s, v in vals if v <= target), None)
    seconds = time.perf_counter() - start
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    elif reached is None:  # ended on its own: its last validation may have reached the target
        vals = [(int(r["step"]), r["val/loss"]) for r in read_metrics(run_dir) if "val/loss" in r]
        reached = next(((s, v) for s, v in vals if v <= target), None)
    if reached is None:
        raise RuntimeError(f"val/loss never reached {target}: {vals} (train.py exit {proc.returncode})")
    return {
        "command": " ".join(args),
        "target": target,
        "seconds": seconds,
        "step": reached[0],
        "val_loss": reached[1],
        "val_losses": vals,
    }


def generate(dry: bool) -> dict:
    """model=medium, random weights, greedy, KV cache: tokens/s at batch 1 and 32, eager and compiled."""
    from model_presets import model_preset

    from gpt.config import ModelConfig
    from gpt.generate.tokens import generate as generate_tokens
    from gpt.model.transformer import GPT

    if dry:
        cfg = ModelConfig(n_layer=2, n_head=2, n_embd=64, block_size=64, vocab_size=50257)
        device, dtype, new_tokens, compile_as = "cpu", torch.float32, 4, "eager"  # a cheap compile
    else:
        cfg = replace(model_preset("medium"), vocab_size=50257)
        device, dtype, new_tokens, compile_as = "cuda", torch.bfloat16, 128, True
    torch.manual_seed(0)
    model = GPT(cfg).to(device=device, dtype=dtype).eval()
    prompt = torch.randint(cfg.vocab_size, (16,), device=device)
    rows = []
    for compile in (False, compile_as):
        for batch in (1, 32):
            idx = prompt.expand(batch, -1)
            kw = dict(temperature=0.0, compile=compile)
            list(generate_tokens(model, idx, 8, **kw))  # warm-up, and compilation
            times = []
            for _ in range(2):
                if device == "cuda":
                    torch.cuda.synchronize()
                t = time.perf_counter()
                list(generate_tokens(model, idx, new_tokens, **kw))
                if device == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t)
            best = min(times)
            rows.append(
                {
                    "compile": bool(compile),
                    "batch": batch,
                    "new_tokens": new_tokens,
                    "seconds": best,
                    "tokens_per_s": batch * new_tokens / best,
                }
            )
    return {"model": "tiny" if dry else "medium", "dtype": str(dtype), "prompt_tokens": 16, "rows": rows}


def pytest_gpu(dry: bool) -> dict:
    """pytest -m gpu: the counts from its JUnit report (on a CPU every test is skipped)."""
    import xml.etree.ElementTree as ET

    report = Path(tempfile.mkdtemp()) / "junit.xml"
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-m",
        "gpu",
        "-q",
        "-p",
        "no:cacheprovider",
        f"--junitxml={report}",
    ]
    if dry:  # only the modules that hold gpu tests: collecting the whole suite takes half a minute
        cmd += ["tests/gpu", "tests/model/test_masks.py"]
    rc = subprocess.run(cmd, cwd=ROOT).returncode
    suite = ET.parse(report).getroot()
    suite = suite if suite.tag == "testsuite" else suite[0]
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    if rc != 0:
        raise RuntimeError(f"pytest -m gpu exited {rc}: {counts}")
    return counts | {"passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]}


STAGES = {
    "matmul": matmul,
    "train": train,
    "shakespeare": shakespeare,
    "generate": generate,
    "pytest_gpu": pytest_gpu,
}


def run_stage(name: str, dry: bool, log) -> dict:
    """One stage in a child process under its timeout: its result, or ok=false with the error."""
    timeout = 300 if dry else TIMEOUTS[name]  # a dry run checks that each stage works, not how fast
    result_file = Path(tempfile.mkdtemp()) / f"{name}.json"
    cmd = [sys.executable, __file__, "--stage", name, "--result", str(result_file)] + ["--dry-run"] * dry
    print(f"=== {name} (timeout {timeout} s)", flush=True)
    log.write(f"=== {name}\n")
    log.flush()
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, timeout=timeout)
        error = None if proc.returncode == 0 else f"exit {proc.returncode} (see device.log)"
    except subprocess.TimeoutExpired:
        error = f"timed out after {timeout} s"
    seconds = round(time.perf_counter() - start, 1)
    if error is None:
        return {"ok": True, "stage_seconds": seconds} | json.loads(result_file.read_text())
    return {"ok": False, "stage_seconds": seconds, "error": error}


def table(result: dict) -> str:
    s = result["stages"]
    lines = [
        f"device run on {result['machine']['gpu'] or 'CPU'} (torch {result['machine']['torch']}, "
        f"dry run: {result['dry_run']})"
    ]
    lines += [
        f"{name:<12} {'ok' if r['ok'] else 'FAILED: ' + r['error']:<40} {r['stage_seconds']:>7.1f} s"
        for name, r in s.items()
    ]
    if s["matmul"]["ok"]:
        lines.append(f"matmul       {s['matmul']['tflops_per_s']:.1f} TFLOP/s ({s['matmul']['dtype']})")
    if s["train"]["ok"]:
        t = s["train"]
        lines.append(
            f"train        {t['model']} {t['batch']} {t['precision']} compile={t['compile']} "
            f"fused={t['fused_adamw']}: {t['tokens_per_s']:,.0f} tokens/s, {t['step_ms']:.1f} ms/step, "
            f"{t['tflops_per_s']:.1f} TFLOP/s, MFU {t['mfu_vs_peak_pct']:.1f}% of 989 TFLOP/s"
            + (
                f", {t['mfu_vs_matmul_pct']:.1f}% of the measured matmul rate"
                if "mfu_vs_matmul_pct" in t
                else ""
            )
            + (f", peak memory {t['peak_memory_gb']:.1f} GB" if t.get("peak_memory_gb") else "")
        )
    if s["shakespeare"]["ok"]:
        r = s["shakespeare"]
        lines.append(
            f"shakespeare  val/loss {r['val_loss']:.3f} <= {r['target']} at step {r['step']}, "
            f"{r['seconds']:.1f} s wall"
        )
    if s["generate"]["ok"]:
        for r in s["generate"]["rows"]:
            lines.append(
                f"generate     compile={r['compile']!s:<5} batch {r['batch']:>2}: "
                f"{r['tokens_per_s']:>10,.1f} tokens/s"
            )
    if s["pytest_gpu"]["ok"]:
        p = s["pytest_gpu"]
        lines.append(f"pytest -m gpu  {p['passed']} passed, {p['skipped']} skipped of {p['tests']}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes")
    parser.add_argument("--out", default="bench/results/device", help="folder for device.json, device.log")
    parser.add_argument("--stage", choices=STAGES, help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stage:
        Path(args.result).write_text(json.dumps(STAGES[args.stage](args.dry_run)))
        return

    from machine import describe

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(out / "device.log", "w") as log:
        stages = {name: run_stage(name, args.dry_run, log) for name in STAGES}
    if stages["matmul"]["ok"] and stages["train"]["ok"]:
        train = stages["train"]
        train["mfu_vs_matmul_pct"] = 100 * train["tflops_per_s"] / stages["matmul"]["tflops_per_s"]
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "dry_run": args.dry_run,
        "machine": describe(),
        "peak_flops": PEAK_BF16,
        "total_seconds": round(time.perf_counter() - start, 1),
        "stages": stages,
    }
    (out / "device.json").write_text(json.dumps(result, indent=2) + "\n")
    text = table(result)
    (out / "device.txt").write_text(text + "\n")
    print(f"\n{text}\nwrote {out / 'device.json'} in {result['total_seconds']} s")


if __name__ == "__main__":
    main()
