"""Training speed: tokens/s and step time per model preset, and what Lightning adds.

For each preset, the same model, batches, optimizer, LR schedule and gradient clipping run in
two loops in this process: GPTLitModule under a Lightning Trainer (as train.py runs it, with its
per-step NaN check, minus checkpoint files and loggers) and a plain PyTorch loop with no such
check. Rounds alternate between the two so that drift in machine speed hits both. Prints a table
and writes JSON.

    python bench/bench_train.py                         # nano and small on a CPU, up to large on a GPU
    python bench/bench_train.py presets=[medium] precision=bf16-mixed peak_flops=989e12   # a GPU

The knobs are in conf/bench_train.yaml; the models are conf/model/<preset>.yaml.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, replace
from pathlib import Path
from types import SimpleNamespace

import hydra
import lightning as L
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from machine import describe, summary  # noqa: E402
from model_presets import check_presets, model_preset  # noqa: E402

from gpt.config import ModelConfig, OptimConfig  # noqa: E402
from gpt.errors import ConfigError, exit_on_user_error
from gpt.model.transformer import GPT
from gpt.train.callbacks import NonFiniteGuard
from gpt.train.lit_module import GPTLitModule
from gpt.train.optim import build_optimizer, build_scheduler
from gpt.train.precision import resolve_precision

CHAR_TOKENIZER = {"kind": "char", "chars": "".join(chr(32 + i) for i in range(65))}
BPE_TOKENIZER = {"kind": "tiktoken", "name": "r50k_base"}


def batches(n: int, batch_size: int, block_size: int, vocab: int, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(vocab, (n * batch_size, block_size), generator=g)
    y = torch.randint(vocab, (n * batch_size, block_size), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class StepTimes(L.Callback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        sync(trainer.strategy.root_device)
        self.times.append(time.perf_counter())


def lightning_loop(module: GPTLitModule, loader: DataLoader, steps: int, accelerator: str, precision: str):
    timer = StepTimes()
    trainer = L.Trainer(
        accelerator=accelerator,
        devices=1,
        precision=precision,
        max_steps=steps,
        gradient_clip_val=1.0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[NonFiniteGuard(), timer],  # the NaN check train.py runs by default
    )
    trainer.fit(module, train_dataloaders=loader)
    return [b - a for a, b in zip(timer.times, timer.times[1:], strict=False)]


def plain_loop(
    model: GPT, cfg: OptimConfig, loader: DataLoader, steps: int, device: torch.device, precision: str
):
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, steps)
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16-mixed" else nullcontext()
    )
    model.train()
    times = []
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast:
            logits = model(x)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        times.append(time.perf_counter())
    return [b - a for a, b in zip(times, times[1:], strict=False)]


def presets(cfg: DictConfig, cuda: bool) -> list[str]:
    """The presets to time, checked against conf/model/ before any is timed."""
    names = cfg.presets if cfg.presets is not None else cfg.gpu_presets if cuda else cfg.cpu_presets
    names = [names] if isinstance(names, str) else list(names)
    check_presets(names)
    return names


def timed_model(name: str, cfg: DictConfig) -> tuple[ModelConfig, int]:
    """The preset's model with the vocabulary it is timed with, and its batch size."""
    vocab = cfg.vocab_sizes.get(name, cfg.vocab_sizes.default)
    batch_size = cfg.batch_size or cfg.batch_sizes.get(name, cfg.batch_sizes.default)
    return replace(model_preset(name), vocab_size=vocab), batch_size


def bench_preset(
    name: str, model_cfg: ModelConfig, batch_size: int, args: SimpleNamespace, device: torch.device
) -> dict:
    vocab = model_cfg.vocab_size
    optim_cfg = OptimConfig(warmup_steps=10)
    tokenizer = CHAR_TOKENIZER if vocab == 65 else BPE_TOKENIZER
    steps = args.warmup + args.steps
    # As train.py's trainer.precision=auto decides for this model (bf16 on a CPU only from 256 wide).
    precision = args.precision or resolve_precision("auto", args.accelerator, width=model_cfg.n_embd)[0]
    per_loop: dict[str, list[float]] = {"lightning": [], "plain": []}
    for _ in range(args.rounds):
        for loop in ("plain", "lightning"):
            torch.manual_seed(0)
            loader = batches(steps, batch_size, model_cfg.block_size, vocab)
            if loop == "lightning":
                module = GPTLitModule(asdict(model_cfg), asdict(optim_cfg), tokenizer)
                if args.compile:
                    module.model.compile()
                dts = lightning_loop(module, loader, steps, args.accelerator, precision)
            else:
                model = GPT(model_cfg).to(device)
                if args.compile:
                    model.compile()
                dts = plain_loop(model, optim_cfg, loader, steps, device, precision)
            per_loop[loop] += dts[args.warmup - 1 :]  # drop warm-up (and compilation) steps
    tokens = batch_size * model_cfg.block_size
    step = {k: statistics.median(v) for k, v in per_loop.items()}
    n_params = GPT(model_cfg).num_params()
    flops_per_step = (
        6 * n_params + 12 * model_cfg.n_layer * model_cfg.n_embd * model_cfg.block_size
    ) * tokens
    row = {
        "preset": name,
        "params": n_params,
        "batch": f"{batch_size}x{model_cfg.block_size}",
        "precision": precision,
        "step_ms_lightning": 1000 * step["lightning"],
        "step_ms_plain": 1000 * step["plain"],
        "overhead_pct": 100 * (step["lightning"] / step["plain"] - 1),
        "tokens_per_s": tokens / step["lightning"],
        "tflops_per_s": flops_per_step / step["lightning"] / 1e12,
        "steps_timed": len(per_loop["lightning"]),
    }
    if args.peak_flops:
        row["mfu_pct"] = 100 * flops_per_step / step["lightning"] / args.peak_flops
    return row


@hydra.main(version_base="1.3", config_path="../conf", config_name="bench_train")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    accelerator = "gpu" if cuda else "cpu"
    args = SimpleNamespace(**OmegaConf.to_container(cfg) | {"accelerator": accelerator})
    if min(args.steps, args.warmup, args.rounds) < 1:  # the first timed step follows a warm-up step
        raise ConfigError(
            f"steps={args.steps}, warmup={args.warmup}, rounds={args.rounds}: each must be >= 1"
        )
    if cuda:
        torch.set_float32_matmul_precision("high")
    models = [(name, *timed_model(name, cfg)) for name in presets(cfg, cuda)]  # all checked first

    rows = [bench_preset(name, model_cfg, batch_size, args, device) for name, model_cfg, batch_size in models]
    machine = describe()
    result = {
        "benchmark": "train",
        "machine": machine,
        "torch": torch.__version__,
        "lightning": L.__version__,
        "precision": args.precision or "auto",
        "compile": args.compile,
        "date": time.strftime("%Y-%m-%d"),
        "rows": rows,
    }
    print(
        f"\ntraining speed on {summary(machine)}\n"
        f"(torch {torch.__version__}, precision {args.precision or 'auto'}, compile={args.compile})"
    )
    header = (
        f"{'preset':<8}{'params':>12}{'batch':>10}{'precision':>12}{'lightning ms':>14}{'plain ms':>10}"
        f"{'overhead':>10}{'tokens/s':>11}{'TFLOP/s':>9}"
    )
    print(header + ("   MFU" if args.peak_flops else ""))
    for r in rows:
        line = (
            f"{r['preset']:<8}{r['params']:>12,}{r['batch']:>10}{r['precision']:>12}{r['step_ms_lightning']:>14.1f}"
            f"{r['step_ms_plain']:>10.1f}{r['overhead_pct']:>+9.1f}%{r['tokens_per_s']:>11,.0f}{r['tflops_per_s']:>9.3f}"
        )
        print(line + (f"{r['mfu_pct']:>6.1f}%" if "mfu_pct" in r else ""))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    exit_on_user_error(main)()
