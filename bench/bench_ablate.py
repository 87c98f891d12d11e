"""What each model option of the GPT-2 speedrun records is worth here: an ablation you can rerun.

python bench/bench_ablate.py                               # both corpora, every option, 3 seeds
python bench/bench_ablate.py corpora=[char] seeds=[0] jobs=2 torch_threads=1   # knobs: conf/bench_ablate.yaml

For each corpus, real `train.py` runs of its baseline and of each option alone (the option's
overrides on top of the baseline's), once per seed, with the validation loss every `eval_every`
steps. Then, if `combine`, the options that helped on that corpus, together. Per option and corpus:
- steps to the baseline's final val loss (the mean over the baseline's seeds): the first step where
  the run's val loss curve, linear between validations, reaches it; mean and spread over the seeds
  that reach it, and how many did;
- final val loss: mean, standard deviation and range over the seeds;
- ms per step: short runs of `timing_steps` steps without validation, one at a time, the options
  taking turns, `timing_rounds` rounds; the median 10-step window of each run (the throughput
  callback's training time), the median round kept.
An option "helped" when its mean final val loss is below the baseline's by more than the larger of
the two standard deviations over seeds. Prints a markdown table per corpus; writes JSON to `out`.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import hydra
import yaml
from omegaconf import DictConfig

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from machine import describe, summary  # noqa: E402

from gpt.errors import ConfigError, exit_on_user_error  # noqa: E402
from gpt.runs.metrics import read_metrics  # noqa: E402

BASELINE = "baseline"
COMBINED = "combined"


def run(cmd: list[str], threads: int | None = None) -> str:
    """Run train.py with these arguments; its stdout. A failure stops the benchmark with its stderr."""
    env = os.environ | ({"OMP_NUM_THREADS": str(threads)} if threads else {})
    proc = subprocess.run([sys.executable, *cmd], cwd=ROOT, capture_output=True, text=True, env=env)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc.stdout


def corpus_steps(base: list[str]) -> int:
    """trainer.max_steps of a corpus's runs, as train.py composes them (its --cfg job)."""
    return int(yaml.safe_load(run([str(ROOT / "train.py"), *base, "--cfg", "job"]))["trainer"]["max_steps"])


def train_cmd(run_dir: Path, cache: Path, overrides: list[str], *extra: str) -> list[str]:
    return [
        str(ROOT / "train.py"),
        *overrides,
        f"data.cache_dir={cache}",
        "~callbacks.progress_bar",
        f"hydra.run.dir={run_dir}",
        *extra,
    ]


def val_curve(run_dir: Path) -> list[tuple[int, float]]:
    """(steps taken, val loss) of every validation of a run, in order (the logged step is the
    index of the last step taken, so one less)."""
    return [(int(r["step"]) + 1, r["val/loss"]) for r in read_metrics(run_dir) if "val/loss" in r]


def steps_to(curve: list[tuple[int, float]], target: float) -> float | None:
    """The first step where the curve, linear between validations, is <= target; None if never."""
    for (s0, v0), (s1, v1) in zip([(0, float("inf")), *curve], curve, strict=False):
        if v1 <= target:
            if v0 == float("inf"):
                return float(s1)
            return s0 + (s1 - s0) * (v0 - target) / (v0 - v1)
    return None


def ms_per_step(run_dir: Path) -> float:
    """The median 10-step window of a run's training time (validation excluded), the first left out."""
    marks = [(r["train/batches"], r["train/time"]) for r in read_metrics(run_dir) if "train/time" in r]
    windows = [(t1 - t0) / (b1 - b0) for (b0, t0), (b1, t1) in zip(marks[1:], marks[2:], strict=False)]
    return 1000 * statistics.median(windows)


def spread(values: list[float]) -> dict[str, float]:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
    }


def helped(option: dict, baseline: dict) -> bool:
    o, b = option["final"], baseline["final"]
    return b["mean"] - o["mean"] > max(o["std"], b["std"])


def summarise(rows: dict[str, dict], seeds: int) -> None:
    """Adds final-loss and steps-to-target statistics to each option's row, in place."""
    target = statistics.fmean(rows[BASELINE]["final_by_seed"])
    for row in rows.values():
        row["final"] = spread(row["final_by_seed"])
        reached = [s for s in (steps_to(c, target) for c in row["curves"]) if s is not None]
        row["target"] = target
        row["reached"] = f"{len(reached)}/{seeds}"
        row["steps_to_target"] = spread(reached) if reached else None


def markdown(corpus: str, rows: dict[str, dict], steps: int) -> str:
    b = rows[BASELINE]
    lines = [
        f"{corpus}: target = the baseline's mean final val loss, {b['target']:.4f}; {steps} steps",
        "",
        f"| option | steps to target, mean (min-max) | % of the baseline's {steps} | seeds that reach it "
        "| final val loss, mean +- std (min-max) | ms / step |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, r in rows.items():
        s, f = r["steps_to_target"], r["final"]
        reach = f"{s['mean']:.0f} ({s['min']:.0f}-{s['max']:.0f})" if s else "-"
        pct = f"{100 * s['mean'] / steps:.0f}%" if s else "-"
        label = name if name != COMBINED else f"combined ({', '.join(r['options'])})"
        ms = f"{r['ms_per_step']:.1f}" if "ms_per_step" in r else "-"
        lines.append(
            f"| {label} | {reach} | {pct} | {r['reached']} | {f['mean']:.4f} +- {f['std']:.4f} "
            f"({f['min']:.4f}-{f['max']:.4f}) | {ms} |"
        )
    return "\n".join(lines)


def train_all(
    jobs: list[tuple[str, int]], rows: dict[str, dict], work: Path, base: list[str], steps: int, args
) -> None:
    """Train each (option, seed) of jobs, `args.jobs` at a time; their val curves go into rows. A run
    of work_dir that already got to its last validation is read, not run again (an interrupted
    benchmark continues where it stopped)."""

    def train(name: str, seed: int) -> list[tuple[int, float]]:
        run_dir = work / f"{name}-{seed}"
        if run_dir.is_dir() and val_curve(run_dir) and val_curve(run_dir)[-1][0] == steps:
            return val_curve(run_dir)
        shutil.rmtree(run_dir, ignore_errors=True)  # a run cut short: from the start
        print(f"{work.name} / {name} / seed {seed} ...", file=sys.stderr, flush=True)
        extra = [f"seed={seed}", f"trainer.val_check_interval={args.eval_every}"]
        run(
            train_cmd(run_dir, work.parent / "cache", base + rows[name]["overrides"], *extra),
            args.torch_threads,
        )
        return val_curve(run_dir)

    with ThreadPoolExecutor(args.jobs) as pool:
        for (name, _), curve in zip(jobs, pool.map(lambda job: train(*job), jobs), strict=True):
            rows[name].setdefault("curves", []).append(curve)
            rows[name].setdefault("final_by_seed", []).append(curve[-1][1])


def ablate(corpus: str, base: list[str], work: Path, args: DictConfig) -> dict:
    """Every option of one corpus, then the winners together, then the timing rounds."""
    cache, work = work / "cache", work / corpus
    # Prepare the corpus once (the first run would, but several at a time would each do it).
    prepare = work / "prepare"
    if not (prepare / "checkpoints/last.ckpt").is_file():
        shutil.rmtree(prepare, ignore_errors=True)
        run(train_cmd(prepare, cache, base, "trainer.max_steps=1"))
    steps = corpus_steps(base)
    rows: dict[str, dict] = {BASELINE: {"overrides": []}}
    rows |= {name: {"overrides": list(o)} for name, o in args.options.items()}
    train_all([(name, seed) for name in rows for seed in args.seeds], rows, work, base, steps, args)
    summarise(rows, len(args.seeds))
    winners = [n for n in args.options if helped(rows[n], rows[BASELINE])]
    if args.combine and len(winners) > 1:
        rows[COMBINED] = {"options": winners, "overrides": [o for n in winners for o in args.options[n]]}
        train_all([(COMBINED, seed) for seed in args.seeds], rows, work, base, steps, args)
        summarise(rows, len(args.seeds))
    return {"baseline": base, "steps": steps, "helped": winners, "rows": rows}


def time_rows(corpus: str, done: dict, work: Path, args: DictConfig) -> None:
    """ms per step of every row of a corpus (short runs, one at a time, the options taking turns)."""
    if args.timing_rounds == 0:
        return
    short = [f"trainer.max_steps={args.timing_steps}", f"trainer.val_check_interval={args.timing_steps}"]
    for r in range(args.timing_rounds):
        for name, row in done["rows"].items():
            print(f"{corpus} / {name}: timing, round {r + 1}", file=sys.stderr, flush=True)
            run_dir = work / corpus / f"timing-{name}-{r}"
            overrides = done["baseline"] + row["overrides"]
            run(train_cmd(run_dir, work / "cache", overrides, *short, "data.val_windows=8"))
            row.setdefault("ms_per_step_rounds", []).append(round(ms_per_step(run_dir), 1))
    for row in done["rows"].values():
        row["ms_per_step"] = statistics.median(row["ms_per_step_rounds"])


@hydra.main(version_base="1.3", config_path="../conf", config_name="bench_ablate")
@exit_on_user_error
def main(args: DictConfig) -> None:
    if min(args.eval_every, args.jobs, args.timing_steps) < 1 or args.timing_rounds < 0 or not args.seeds:
        raise ConfigError(
            f"eval_every={args.eval_every}, jobs={args.jobs}, timing_steps={args.timing_steps} must be >= 1, "
            f"timing_rounds={args.timing_rounds} >= 0 and seeds={list(args.seeds)} not empty"
        )
    out = Path(args.out) if args.out else ROOT / "bench/results/ablate.json"
    if args.timing_only and not out.is_file():
        raise ConfigError(
            f"timing_only=true times the runs of {out}, which does not exist; run without it first"
        )
    result: dict = {"date": datetime.date.today().isoformat(), "seeds": list(args.seeds), "corpora": {}}
    if args.timing_only:
        result = json.loads(out.read_text())
    with tempfile.TemporaryDirectory() as tmp:
        for corpus, base in args.corpora.items():
            if not args.timing_only:
                result["corpora"][corpus] = ablate(corpus, list(base), Path(args.work_dir or tmp), args)
            done = result["corpora"][corpus]
            time_rows(corpus, done, Path(args.work_dir or tmp), args)
            print(markdown(corpus, done["rows"], done["steps"]), flush=True)
    result["machine"] = describe()
    print(f"{result['date']}, {summary(result['machine'])}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
