"""Run every benchmark, one after the other, and print a summary; JSON goes to bench/results/.

    python bench/run.py                 # train (Lightning vs plain), generate, serve, prepare, tokenizer
    python bench/run.py only=[train]    # some of them (conf/bench_run.yaml)

Each benchmark runs in its own process, so none inherits another's threads, caches or memory.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpt.errors import ConfigError, exit_on_user_error  # noqa: E402

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
SCRIPTS = {
    "train": "bench_train.py",
    "generate": "bench_generate.py",
    "serve": "bench_serve.py",
    "prepare": "bench_prepare.py",
    "tokenizer": "bench_tokenizer.py",
}


def summary(name: str, result: dict) -> list[str]:
    if name == "train":
        return [
            f"train    {r['preset']}: {r['tokens_per_s']:,.0f} tokens/s, "
            f"{r['step_ms_lightning']:.1f} ms/step, Lightning vs plain loop {r['overhead_pct']:+.1f}%"
            for r in result["rows"]
        ]
    return [f"{name:<8} {json.dumps({k: v for k, v in result.items() if not isinstance(v, (list, dict))})}"]


def chosen(only: str | list[str] | None) -> list[str]:
    names = list(SCRIPTS) if only is None else [only] if isinstance(only, str) else list(only)
    unknown = [name for name in names if name not in SCRIPTS]
    if unknown:
        raise ConfigError(f"only={unknown[0]} is no benchmark; choose from {', '.join(SCRIPTS)}")
    return names


@hydra.main(version_base="1.3", config_path="../conf", config_name="bench_run")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    lines = []
    for name in chosen(cfg.only):
        out = RESULTS / f"{name}.json"
        print(f"\n=== {name}", flush=True)
        quoted = "'" + str(out).replace("'", "\\'") + "'"  # any path, as Hydra reads it back
        subprocess.run([sys.executable, str(BENCH / SCRIPTS[name]), f"out={quoted}"], check=True)
        lines += summary(name, json.loads(out.read_text()))
    print("\n=== summary\n" + "\n".join(lines))


if __name__ == "__main__":
    exit_on_user_error(main)()
