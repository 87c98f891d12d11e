"""Our CPU recipe against nanoGPT's, side by side: wall time from launch to exit and final val loss.

    python bench/bench_recipe.py nanogpt_dir=../nanoGPT                  # 3 rounds
    python bench/bench_recipe.py nanogpt_dir=../nanoGPT rounds=5 cpu_kind=avx2
    python bench/bench_recipe.py nanogpt_dir=../nanoGPT ours=[experiment=shakespeare_char_cpu,seed=1]

Each round runs nanoGPT's CPU recipe for Tiny Shakespeare (its train.py, in `nanogpt_dir`, with
`nanogpt_args`) and ours (`python train.py <ours>`), each a subprocess timed from launch to exit,
the order flipped every round so that drift in the machine's speed hits both. Both data
preparations are one-offs and are done once before the first round, untimed: nanoGPT's
data/shakespeare_char/prepare.py (train.bin, val.bin, meta.pkl; its input.txt copied from our
Tiny Shakespeare when it has none, as it would otherwise download it) and our data cache for the
data config `ours` composes. `python=` picks the interpreter of every run (default: this one), e.g.
a virtual environment with only `pip install -e .`, what the README's Quickstart installs: there
`import lightning` takes seconds less than beside the dev extras (torchmetrics imports transformers
and scipy when they are installed). Final val loss: nanoGPT's last `step N: train loss X, val loss Y`
line, ours the summary's `final val/loss X` (else its last validation line). Prints a table and
the median ratio ours / nanoGPT; writes JSON to `out`. The knobs are in conf/bench_recipe.yaml.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gpt.errors import ConfigError, exit_on_user_error  # noqa: E402

NANOGPT_URL = "https://github.com/karpathy/nanoGPT"
NANOGPT_FILES = ("train.py", "model.py", "configurator.py", "data/shakespeare_char/prepare.py")
CPU_KINDS = {"avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}}
NANOGPT_EVAL = re.compile(r"^step (\d+): train loss ([0-9.]+), val loss ([0-9.]+)", re.MULTILINE)
OURS_FINAL = re.compile(r"final val/loss ([0-9.]+)")
OURS_VALIDATION = re.compile(r"validation at step \d+: val/loss ([0-9.]+)")


def missing_nanogpt(nanogpt_dir: str | None, commit: str) -> str | None:
    """One line saying how to get nanoGPT, or None when `nanogpt_dir` holds its files."""
    folder = Path(nanogpt_dir).expanduser() if nanogpt_dir else None
    if folder is not None and all((folder / f).is_file() for f in NANOGPT_FILES):
        return None
    where = f"{nanogpt_dir} has no nanoGPT checkout" if nanogpt_dir else "nanogpt_dir is not set"
    target = nanogpt_dir or "../nanoGPT"
    return (
        f"{where}: get it with `git clone {NANOGPT_URL} {target} && git -C {target} checkout {commit}` "
        f"and pass nanogpt_dir={target}"
    )


def nanogpt_val_loss(output: str) -> float | None:
    """The val loss of nanoGPT's last evaluation (`step N: train loss X, val loss Y`)."""
    found = NANOGPT_EVAL.findall(output)
    return float(found[-1][2]) if found else None


def ours_val_loss(output: str) -> float | None:
    """The final val loss train.py reports: its summary's `final val/loss X`, else the last
    `validation at step N: val/loss X` line."""
    found = OURS_FINAL.findall(output) or OURS_VALIDATION.findall(output)
    return float(found[-1]) if found else None


def as_list(value: object) -> list[str]:
    """A list knob given as a list, or as one string of space-separated arguments."""
    if value is None:
        return []
    if isinstance(value, str):
        return shlex.split(value)
    return [str(v) for v in value]


def cpu_env(kind: str | None) -> dict[str, str]:
    if kind is None:
        return {}
    if kind not in CPU_KINDS:
        raise ConfigError(f"cpu_kind={kind!r}; choose null or one of {', '.join(CPU_KINDS)}")
    return CPU_KINDS[kind]


def timed(cmd: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, str]:
    """(seconds from launch to exit, stdout and stderr together). A failure stops the benchmark."""
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wall = time.perf_counter() - start
    if proc.returncode:
        raise RuntimeError(f"{shlex.join(cmd)} (in {cwd}) failed ({proc.returncode}):\n{proc.stdout[-3000:]}")
    return wall, proc.stdout


def interpreter(python: str | None) -> str:
    """The Python every run uses: `python`, else this one."""
    if python is None:
        return sys.executable
    found = shutil.which(str(Path(python).expanduser()))
    if found is None:
        raise ConfigError(f"python={python}: no such interpreter; give the path of a python executable")
    return found


def prepare_nanogpt(folder: Path, env: dict[str, str], python: str) -> None:
    """nanoGPT's one-off data step: train.bin, val.bin and meta.pkl, from our Tiny Shakespeare."""
    data = folder / "data" / "shakespeare_char"
    if not (data / "input.txt").is_file():
        ours = Path(os.environ.get("GPT_DATA_DIR") or ROOT / "data") / "tinyshakespeare.txt"
        if ours.is_file():
            shutil.copyfile(ours, data / "input.txt")  # else its prepare.py downloads it
    timed([python, "data/shakespeare_char/prepare.py"], folder, env)


def prepare_ours(overrides: list[str]) -> str:
    """Our one-off data step: the data cache of the data config train.py composes from `overrides`
    (tokenized once; every timed run then reads the cache)."""
    from hydra import compose

    import train  # noqa: F401  (registers the config schemas train.py composes with)
    from gpt.data.prepare import prepare

    cfg = compose("train", overrides=[o for o in overrides if not o.lstrip("+~").startswith("hydra.")])
    cwd = os.getcwd()
    os.chdir(ROOT)  # train.py runs there, and data paths are relative to it
    try:
        return str(prepare(OmegaConf.to_object(cfg.data), verbose=False).dir)
    finally:
        os.chdir(cwd)


def table(rows: list[dict]) -> str:
    lines = [
        "| round | nanoGPT wall s | nanoGPT val loss | ours wall s | ours val loss | ours / nanoGPT |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['round']} | {r['nanogpt_s']:.1f} | {r['nanogpt_val_loss']:.4f} | {r['ours_s']:.1f} | "
            f"{r['ours_val_loss']:.4f} | {r['ratio']:.3f} |"
        )
    return "\n".join(lines)


@hydra.main(version_base="1.3", config_path="../conf", config_name="bench_recipe")
@exit_on_user_error
def main(args: DictConfig) -> None:
    missing = missing_nanogpt(args.nanogpt_dir, args.nanogpt_commit)
    if missing:
        raise ConfigError(missing)
    if args.rounds < 1:
        raise ConfigError(f"rounds={args.rounds}: must be >= 1")
    folder = Path(args.nanogpt_dir).expanduser().resolve()
    overrides = as_list(args.ours)
    env = os.environ | cpu_env(args.cpu_kind)
    python = interpreter(args.python)
    nanogpt_cmd = [python, "train.py", *as_list(args.nanogpt_args)]
    out = Path(args.out)

    print("preparing data (once, untimed) ...", file=sys.stderr, flush=True)
    prepare_nanogpt(folder, env, python)
    cache = prepare_ours(overrides)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work_dir or tmp)
        for r in range(1, args.rounds + 1):
            row: dict[str, object] = {"round": r}
            order = ("nanogpt", "ours") if r % 2 else ("ours", "nanogpt")
            for who in order:
                print(f"round {r}: {who} ...", file=sys.stderr, flush=True)
                if who == "nanogpt":
                    wall, output = timed(nanogpt_cmd, folder, env)
                    loss = nanogpt_val_loss(output)
                else:
                    run_dir = work / f"ours-{r}"
                    cmd = [python, "train.py", *overrides, f"hydra.run.dir={run_dir}"]
                    wall, output = timed(cmd, ROOT, env)
                    loss = ours_val_loss(output)
                if loss is None:
                    raise RuntimeError(f"no final val loss in the output of {who}:\n{output[-3000:]}")
                row[f"{who}_s"], row[f"{who}_val_loss"] = round(wall, 2), loss
            row["ratio"] = round(row["ours_s"] / row["nanogpt_s"], 4)
            rows.append(row)

    from machine import describe, summary  # torch is imported only once there is something to run

    machine = describe()
    median = statistics.median(r["ratio"] for r in rows)
    worst = max(r["ours_val_loss"] for r in rows)
    verdict = (
        f"median ours / nanoGPT {median:.3f} (target <= {args.max_ratio}), ours' worst val loss "
        f"{worst:.4f} (target <= {args.max_val_loss}): "
        + ("met" if median <= args.max_ratio and worst <= args.max_val_loss else "not met")
    )
    cpu = f", cpu_kind={args.cpu_kind}" if args.cpu_kind else ""
    cpu += f", python={python}" if args.python else ""
    print(f"{datetime.date.today().isoformat()}, {summary(machine)}{cpu}\n{table(rows)}\n{verdict}")
    result = {
        "date": datetime.date.today().isoformat(),
        "machine": machine,
        "cpu_kind": args.cpu_kind,
        "cpu_env": cpu_env(args.cpu_kind),
        "python": python,
        "nanogpt_dir": str(folder),
        "nanogpt_command": shlex.join(["python", *nanogpt_cmd[1:]]),
        "ours_command": shlex.join(["python", "train.py", *overrides]),
        "ours_data_cache": cache,
        "rows": rows,
        "median_ratio": median,
        "max_ratio": args.max_ratio,
        "max_val_loss": args.max_val_loss,
        "met": median <= args.max_ratio and worst <= args.max_val_loss,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
