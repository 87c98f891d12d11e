"""Compare training runs from their own run dirs: a table and a loss plot, no wandb account needed.

python compare.py runs='runs/2026-11-21/*'                      # a glob (compare expands it)
python compare.py runs=[runs/multirun/2026-11-21/10-00-00] out=sweep.png   # a folder of runs

The table has the config values that differ between the runs, then parameters, steps, tokens seen,
best validation loss and its perplexity, tokens/s and the time spent in training steps (validation
excluded, summed over resumes), then the results that
evaluate.py wrote into each run's evals/ (a column per file and metric, such as hellaswag/acc_norm).
The plot shows train and validation loss against tokens seen.
"""

from __future__ import annotations

import csv
import glob
import json
import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from gpt.config import CompareConfig, ModelConfig
from gpt.errors import UserError
from gpt.model.encoder_decoder import build_model
from gpt.runs.checkpoint import newest_checkpoint, read_checkpoint
from gpt.runs.metrics import read_metrics


@dataclass
class Run:
    path: Path
    config: dict[str, Any]  # .hydra/config.yaml, flattened to dotted keys
    rows: list[dict[str, float]]  # the stitched CSV log
    params: int | None = None
    steps: int | None = None
    tokens: float | None = None
    best_val_loss: float | None = None
    best_val_ppl: float | None = None
    tokens_per_sec: float | None = None
    wall_time: float | None = None  # seconds
    # evaluate.py's results in <run>/evals/<name>.json, as {"<name>/<metric>": value}
    evals: dict[str, float] = field(default_factory=dict)
    label: str = field(default="")


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in d.items():
        if isinstance(value, dict) and value:
            out |= flatten(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def is_run_dir(path: Path) -> bool:
    return (path / ".hydra" / "config.yaml").is_file() and (path / "csv").is_dir()


def runs_under(path: Path) -> list[Path]:
    """The run dir itself, or the run dirs somewhere under a folder (a sweep, a day of runs)."""
    if is_run_dir(path):
        return [path]
    return sorted(p.parent.parent for p in path.glob("**/.hydra/config.yaml") if is_run_dir(p.parent.parent))


def expand(patterns: list[str]) -> list[Path]:
    """Run dirs named by paths or globs; a glob keeps the matches that hold runs."""
    runs: list[Path] = []
    for pattern in patterns:
        if glob.has_magic(pattern):
            found = [run for match in sorted(glob.glob(pattern)) for run in runs_under(Path(match))]
            if not found:
                raise UserError(f"{pattern} matches no run dir; pass run dirs (folders that train.py wrote)")
        else:
            found = runs_under(Path(pattern))
            if not found:
                what = (
                    "does not exist"
                    if not Path(pattern).exists()
                    else "holds no run (.hydra/config.yaml, csv/)"
                )
                raise UserError(f"{pattern} {what}; pass run dirs that train.py wrote")
        runs.extend(found)
    return list(dict.fromkeys(runs))  # once each, in the order given


def count_params(model_config: dict[str, Any]) -> int:
    """The model's parameter count as the README counts it (no learned positions, tied head once),
    from its config alone: the model is built on the meta device, without memory."""
    with torch.device("meta"):
        return build_model(ModelConfig(**model_config)).num_params()


def wall_seconds(rows: list[dict[str, float]]) -> float | None:
    """Training time from Lightning's ThroughputMonitor (`train/time`, seconds since the start of
    fit): it restarts at each resume, so the peak before every restart is added up."""
    times = [r["train/time"] for r in rows if "train/time" in r]
    if not times:
        return None
    total = 0.0
    for prev, cur in zip(times, times[1:], strict=False):
        if cur < prev:
            total += prev
    return total + times[-1]


def read_config(path: Path) -> dict[str, Any]:
    """The run's .hydra/config.yaml, flattened to dotted keys."""
    file = path / ".hydra" / "config.yaml"
    try:
        config = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        problem = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{file} is not readable YAML ({problem}); fix it or leave {path} out") from None
    if not isinstance(config, dict):
        raise UserError(f"{file} holds a {type(config).__name__}, not a config; fix it or leave {path} out")
    return flatten(config)


def read_log(path: Path) -> list[dict[str, float]]:
    try:
        return read_metrics(path)
    except (ValueError, KeyError, csv.Error) as e:  # a number that is not one, no step column
        raise UserError(
            f"the CSV log in {path}/csv/ is not readable ({type(e).__name__}: {e}); fix or remove the "
            f"broken metrics.csv, or leave {path} out"
        ) from None


def read_evals(path: Path) -> dict[str, float]:
    """The metrics of each <run>/evals/<name>.json that evaluate.py wrote, as "<name>/<metric>". Files
    of another shape (the outputs of older versions) are passed over; an unreadable one is named."""
    evals: dict[str, float] = {}
    for file in sorted((path / "evals").glob("*.json")):
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            note = f"note: {file} is not readable JSON ({type(e).__name__}); its results are left out"
            print(note, file=sys.stderr)
            continue
        metrics = data.get("metrics") if isinstance(data, dict) and "task" in data else None
        if isinstance(metrics, dict):
            evals |= {
                f"{file.stem}/{k}": float(v)
                for k, v in metrics.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool)
            }
    return evals


def read_run(path: Path) -> Run:
    run = Run(path=path, config=read_config(path), rows=read_log(path))
    train = [r for r in run.rows if "train/tokens" in r]
    val = [r for r in run.rows if "val/loss" in r]
    ckpt_path = newest_checkpoint(path, readable=False)  # a broken newest file is reported, not skipped
    if ckpt_path is not None:
        # mmap: only the few fields read here are loaded, not the weights.
        ckpt = read_checkpoint(ckpt_path, mmap=True, fix=f"remove it or leave {path} out")
        try:
            run.params = count_params(ckpt["hyper_parameters"]["model"])
        except (KeyError, TypeError):  # a checkpoint of another version of the model config
            run.params = None
        run.steps = int(ckpt["global_step"]) if "global_step" in ckpt else None
        run.tokens = float(ckpt.get("tokens_seen", 0)) or None
    if run.steps is None and run.rows:
        run.steps = int(max(r["step"] for r in run.rows)) + 1
    if run.tokens is None and train:
        run.tokens = train[-1]["train/tokens"]
    if val:
        best = min(val, key=lambda r: r["val/loss"])
        run.best_val_loss, run.best_val_ppl = best["val/loss"], math.exp(best["val/loss"])
    run.wall_time = wall_seconds(run.rows)
    run.evals = read_evals(path)
    # The throughput window (50 steps by default) gives steady-state tokens/s; a run too short for
    # it falls back to tokens over training time.
    windowed = [r["train/items_per_sec"] for r in run.rows if "train/items_per_sec" in r]
    if windowed:
        run.tokens_per_sec = statistics.median(windowed)
    elif run.tokens and run.wall_time:
        run.tokens_per_sec = run.tokens / run.wall_time
    return run


def differing_keys(runs: list[Run]) -> list[str]:
    # A key missing from a run (written before the knob existed) counts as null, its usual default.
    keys = sorted({k for run in runs for k in run.config})
    return [k for k in keys if len({repr(run.config.get(k)) for run in runs}) > 1]


def short_names(paths: list[Path]) -> list[str]:
    """Each path without the folders all of them share, so the table shows what tells them apart."""
    parts = [p.resolve().parts for p in paths]
    common = 0
    while len(parts) > 1 and all(len(p) > common + 1 and p[common] == parts[0][common] for p in parts):
        common += 1
    return [
        "/".join(p[common:]) if len(paths) > 1 else str(path) for p, path in zip(parts, paths, strict=True)
    ]


def fmt_count(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.0f}"


def fmt_value(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, list):
        return ",".join(map(str, v))
    return str(v)


def fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    m, s = divmod(round(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}"


def fmt_float(x: float | None, digits: int) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def fmt_metric(key: str, x: float | None) -> str:
    """An evaluation result: bpb and losses with four decimals, percentages (acc 28.92) and
    perplexities with two."""
    if x is None:
        return "-"
    return f"{x:.4f}" if key.rsplit("/", 1)[-1] in ("bpb", "loss") else f"{x:.2f}"


def table(runs: list[Run]) -> list[list[str]]:
    """Header and one row per run, as strings."""
    keys = differing_keys(runs)
    evals = sorted({k for run in runs for k in run.evals})
    header = [
        "run",
        *keys,
        "params",
        "steps",
        "tokens",
        "best val loss",
        "val ppl",
        "tokens/s",
        "train time",
        *evals,
    ]
    rows = [header]
    for run in runs:
        rows.append(
            [
                run.label,
                *(fmt_value(run.config.get(k)) for k in keys),
                fmt_count(run.params),
                "-" if run.steps is None else str(run.steps),
                fmt_count(run.tokens),
                fmt_float(run.best_val_loss, 4),
                fmt_float(run.best_val_ppl, 2),
                fmt_count(run.tokens_per_sec),
                fmt_duration(run.wall_time),
                *(fmt_metric(k, run.evals.get(k)) for k in evals),
            ]
        )
    return rows


def render(rows: list[list[str]]) -> str:
    widths = [min(max(len(r[i]) for r in rows), 48) for i in range(len(rows[0]))]
    line = lambda r: "  ".join(c[:w].ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
    return "\n".join([line(rows[0]), "  ".join("-" * w for w in widths), *map(line, rows[1:])])


def tokens_axis(rows: list[dict[str, float]], key: str) -> tuple[list[float], list[float]]:
    """(tokens seen, value) for each logged `key`. Tokens are counted per optimizer step (the same
    every step), so a validation row's step is turned into tokens with the training rows' rate."""
    train = [r for r in rows if "train/tokens" in r]
    if not train:
        return [], []
    per_step = train[-1]["train/tokens"] / (train[-1]["step"] + 1)
    points = [((r["step"] + 1) * per_step, r[key]) for r in rows if key in r]
    return [x for x, _ in points], [y for _, y in points]


def plot(runs: list[Run], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    keys = differing_keys(runs)
    fig, axes = plt.subplots(1, 2, figsize=(13, 5), sharex=True, sharey=True, constrained_layout=True)
    for i, run in enumerate(runs):
        color = f"C{i % 10}"
        diff = ", ".join(f"{k}={fmt_value(run.config.get(k))}" for k in keys)
        label = run.label + (f" ({diff})" if diff else "")
        for ax, key, style in ((axes[0], "train/loss", "-"), (axes[1], "val/loss", "o-")):
            x, y = tokens_axis(run.rows, key)
            ax.plot(x, y, style, color=color, label=label[:90], markersize=4, linewidth=1.5)
    for ax, title in zip(axes, ("train loss", "validation loss"), strict=True):
        ax.set_title(title)
        ax.set_xlabel("tokens seen")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("loss (nats/token)")
    axes[1].legend(fontsize=8, loc="upper right")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def check_out(out: Path) -> None:
    """Refuse a plot path that cannot be written before any run is read."""
    from matplotlib.backend_bases import FigureCanvasBase

    formats = FigureCanvasBase.get_supported_filetypes()
    if out.suffix and out.suffix[1:].lower() not in formats:
        raise UserError(f"out={out}: cannot write a {out.suffix} plot; name a .png, .pdf or .svg file")
    if out.is_dir():
        raise UserError(f"out={out} is a folder; name a file such as {out / 'compare.png'}")
    folder = out.parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise UserError(f"out={out}: {folder} is a file, not a folder; pick another path for the plot")


def compare_runs(cfg: CompareConfig) -> None:
    """compare.py: the table on stdout and the loss plot in cfg.out, whose path is checked first."""
    out = Path(cfg.out)
    check_out(out)
    runs = [read_run(p) for p in expand(cfg.runs)]
    for run, name in zip(runs, short_names([r.path for r in runs]), strict=True):
        run.label = name
    print(render(table(runs)))
    try:
        plot(runs, out)
    except OSError as e:  # no permission, a full disk
        raise UserError(f"could not write the plot to {cfg.out} ({e}); pass another out=") from None
    print(f"\nplot: {cfg.out}", file=sys.stderr)
