"""Run every benchmark, one after the other, and print a summary; JSON goes to bench/results/.

    python bench/run.py                 # train (Lightning vs plain), generate, prepare
    python bench/run.py --only train    # one of them

Each benchmark runs in its own process, so none inherits another's threads, caches or memory.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
SCRIPTS = {"train": "bench_train.py", "generate": "bench_generate.py", "prepare": "bench_prepare.py"}


def summary(name: str, result: dict) -> list[str]:
    if name == "train":
        return [
            f"train    {r['preset']}: {r['tokens_per_s']:,.0f} tokens/s, "
            f"{r['step_ms_lightning']:.1f} ms/step, Lightning vs plain loop {r['overhead_pct']:+.1f}%"
            for r in result["rows"]
        ]
    return [f"{name:<8} {json.dumps({k: v for k, v in result.items() if not isinstance(v, (list, dict))})}"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=sorted(SCRIPTS), action="append", help="run only these (repeatable)")
    args = p.parse_args()
    lines = []
    for name in args.only or list(SCRIPTS):
        out = RESULTS / f"{name}.json"
        print(f"\n=== {name}", flush=True)
        subprocess.run([sys.executable, str(BENCH / SCRIPTS[name]), "--out", str(out)], check=True)
        lines += summary(name, json.loads(out.read_text()))
    print("\n=== summary\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
