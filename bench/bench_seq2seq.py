"""Decoder-only, prefix LM and encoder-decoder on the same pairs, from scratch on this machine.

python bench/bench_seq2seq.py                          # numbers and reverse, 1,000 steps each
python bench/bench_seq2seq.py tasks=[reverse] steps=500   # knobs: conf/bench_seq2seq.yaml

For each task of scripts/make_pairs.py and each architecture, a real `train.py experiment=numbers`
run (with the architecture's overrides) on the task's training pairs, its held-out exact match
(greedy) logged every eval_every steps by callbacks.evaluate; then `evaluate.py` on the 500 test
pairs, which training never saw, greedy and beam (4 beams). Reports per run: parameters, the first
step whose logged exact match is >= 99%, and the test exact match. Time per training step comes
from short runs of `timing_steps` steps without evaluation, the architectures taking turns,
`timing_rounds` rounds: the median 10-step window of each run (the ThroughputMonitor's training
time, validation excluded), the best round kept (a long run's own windows drift with the machine's
speed). timing_only=true runs only those. Prints a
markdown table; writes JSON to `out`.
"""

from __future__ import annotations

import datetime
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from machine import describe, summary  # noqa: E402

from gpt.config import ModelConfig  # noqa: E402
from gpt.errors import ConfigError, exit_on_user_error  # noqa: E402
from gpt.model.encoder_decoder import build_model  # noqa: E402
from gpt.runs.metrics import read_metrics  # noqa: E402

TASKS = ("numbers", "reverse")
EXACT = "eval/generate/greedy/exact_match"


def run(cmd: list[str], cwd: Path) -> str:
    """Run a command of this repository; its stdout. A failure stops the benchmark with its stderr."""
    proc = subprocess.run([sys.executable, *cmd], cwd=cwd, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc.stdout


def train_cmd(task_dir: Path, run_dir: Path, overrides: list[str], args: DictConfig) -> list[str]:
    return [
        str(ROOT / "train.py"),
        "experiment=numbers",
        f"data.path={task_dir / 'train.jsonl'}",
        f"data.cache_dir={run_dir.parent / 'cache'}",
        f"trainer.max_steps={args.steps}",
        f"trainer.val_check_interval={args.eval_every}",
        f"callbacks.evaluate.every_n_steps={args.eval_every}",
        f"callbacks.evaluate.limit={args.eval_limit}",
        f"seed={args.seed}",
        "~callbacks.progress_bar",
        f"hydra.run.dir={run_dir}",
        *overrides,
    ]


def ms_per_step(task_dir: Path, run_dir: Path, overrides: list[str], args: DictConfig) -> float:
    """Milliseconds per step of a short run (no evaluation, one validation at the end)."""
    short = [f"trainer.max_steps={args.timing_steps}", f"trainer.val_check_interval={args.timing_steps}"]
    run([*train_cmd(task_dir, run_dir, overrides, args), *short, "callbacks.evaluate.every_n_steps=0"], ROOT)
    # The ThroughputMonitor's cumulative training time (validation excluded) and batches, logged
    # every 10 steps: the median of the 10-step windows after the first (warm-up) one.
    marks = [(r["train/batches"], r["train/time"]) for r in read_metrics(run_dir) if "train/time" in r]
    windows = [(t1 - t0) / (b1 - b0) for (b0, t0), (b1, t1) in zip(marks[1:], marks[2:], strict=False)]
    return 1000 * statistics.median(windows)


def train_and_score(task_dir: Path, run_dir: Path, overrides: list[str], args: DictConfig) -> dict:
    cmd = train_cmd(task_dir, run_dir, overrides, args)
    start = time.perf_counter()
    run(cmd, ROOT)
    wall = time.perf_counter() - start
    metrics = read_metrics(run_dir)
    exact = {int(r["step"]): r[EXACT] for r in metrics if EXACT in r}  # step: steps taken
    test = run(
        [
            str(ROOT / "evaluate.py"),
            f"ckpt={run_dir}",
            f"data.path={task_dir / 'test.jsonl'}",
            "methods=[greedy,beam]",
        ],
        ROOT,
    )
    table = {line.split()[0]: line.split()[1:] for line in test.strip().splitlines()}
    hparams = torch.load(run_dir / "checkpoints/last.ckpt", weights_only=True, mmap=True)["hyper_parameters"]
    return {
        "params": build_model(ModelConfig(**hparams["model"])).num_params(),
        "steps_to_99": next((step for step, value in sorted(exact.items()) if value >= 99.0), None),
        "exact_match_by_step": exact,
        "command_s": round(wall, 1),
        "test_greedy": float(table["exact_match"][0]),
        "test_beam": float(table["exact_match"][1]),
    }


def markdown(rows: list[dict], steps: int) -> str:
    lines = [
        "| task | architecture | parameters | steps to 99% (val, greedy) | ms / step | test greedy "
        "| test beam |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        reached = r.get("steps_to_99", "-") if r.get("steps_to_99", "-") is not None else f"not in {steps}"
        test = [f"{r[k]:.1f}" if k in r else "-" for k in ("test_greedy", "test_beam")]
        params = f"{r['params'] / 1e6:.2f}M" if "params" in r else "-"
        lines.append(
            f"| {r['task']} | {r['arch']} | {params} | {reached} | {r['ms_per_step']:.1f} | "
            f"{test[0]} | {test[1]} |"
        )
    return "\n".join(lines)


@hydra.main(version_base="1.3", config_path="../conf", config_name="bench_seq2seq")
@exit_on_user_error
def main(args: DictConfig) -> None:
    unknown = [t for t in args.tasks if t not in TASKS]
    if unknown:
        raise ConfigError(f"tasks has {unknown[0]!r}; choose from {', '.join(TASKS)}")
    if min(args.steps, args.eval_every, args.eval_limit, args.timing_steps, args.timing_rounds) < 1:
        raise ConfigError(
            f"steps={args.steps}, eval_every={args.eval_every}, eval_limit={args.eval_limit}, "
            f"timing_steps={args.timing_steps}, timing_rounds={args.timing_rounds}: each must be >= 1"
        )
    out = Path(args.out) if args.out else ROOT / "bench/results/seq2seq.json"
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work_dir or tmp)
        rows = []
        for task in args.tasks:
            task_dir = work / task
            run([str(ROOT / "scripts/make_pairs.py"), task, "--out", str(task_dir)], ROOT)
            task_rows = {
                arch: {"task": task, "arch": arch, "overrides": list(o)} for arch, o in args.archs.items()
            }
            for arch, overrides in args.archs.items():
                if not args.timing_only:
                    print(f"{task} / {arch} ...", file=sys.stderr, flush=True)
                    run_dir = work / "runs" / f"{task}-{arch}"
                    task_rows[arch] |= train_and_score(task_dir, run_dir, list(overrides), args)
            for r in range(args.timing_rounds):
                for arch, overrides in args.archs.items():
                    print(f"{task} / {arch}: timing, round {r + 1}", file=sys.stderr, flush=True)
                    ms = ms_per_step(task_dir, work / "timing" / f"{task}-{arch}-{r}", list(overrides), args)
                    task_rows[arch].setdefault("ms_per_step_rounds", []).append(round(ms, 1))
            for row in task_rows.values():
                row["ms_per_step"] = min(row["ms_per_step_rounds"])
            rows += task_rows.values()
    machine = describe()
    table = markdown(rows, args.steps)
    print(f"{datetime.date.today().isoformat()}, {summary(machine)}\n{table}")
    result = {
        "date": datetime.date.today().isoformat(),
        "machine": machine,
        "steps": args.steps,
        "rows": rows,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
