"""Generation speed: tokens/s cached vs uncached and batch 1 vs 8, and process start to first token.

python bench/bench_generate.py                       # table on stdout, JSON in bench/results/
python bench/bench_generate.py out=/tmp/gen.json repeats=5 compile=true    # knobs: conf/bench_generate.yaml

Needs no training: it saves random-weight checkpoints of the `small` preset (the decoding runs)
and the `nano` preset (start to first token, through a real `python generate.py` subprocess) in
the plain format train.py writes. Speed does not depend on what the weights learned.
"""

from __future__ import annotations

import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from machine import describe, summary  # noqa: E402
from model_presets import model_preset  # noqa: E402

from gpt.errors import ConfigError, exit_on_user_error  # noqa: E402
from gpt.generate.tokens import generate  # noqa: E402
from gpt.model.transformer import GPT  # noqa: E402
from gpt.runs.checkpoint import load_model, save_weights_checkpoint  # noqa: E402
from gpt.tokenizer import CharTokenizer  # noqa: E402

# The 65 characters of Tiny Shakespeare: the vocabulary of the default data (shakespeare_char).
SHAKESPEARE_CHARS = "\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
PROMPT = "ROMEO:\nBut, soft"  # 16 characters = 16 tokens


def random_checkpoint(name: str, folder: Path) -> Path:
    """A checkpoint of the `name` preset with random weights (seeded), made once and reused."""
    path = folder / f"{name}-random.ckpt"
    if not path.is_file():
        tokenizer = CharTokenizer(SHAKESPEARE_CHARS)
        torch.manual_seed(0)
        model = GPT(replace(model_preset(name), vocab_size=tokenizer.vocab_size))
        save_weights_checkpoint(model, tokenizer, path)
    return path


def time_decoding(model, prompt_ids, batch, new_tokens, use_cache, repeats, compile=False):
    """Seconds of each run generating new_tokens for `batch` copies of the prompt, and the tokens."""
    idx = torch.tensor([prompt_ids] * batch)
    kw = dict(temperature=0.8, top_k=200, use_cache=use_cache, compile=compile)
    # warm-up (and, with compile, the compilation), not timed
    list(generate(model, idx, 8, generator=torch.Generator().manual_seed(0), **kw))
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = list(generate(model, idx, new_tokens, generator=torch.Generator().manual_seed(0), **kw))
        times.append(time.perf_counter() - start)
    return times, torch.stack(out, dim=1)


def time_to_first_token(ckpt: Path, repeats: int) -> list[float]:
    """Seconds from starting `python generate.py` to the first generated character on its stdout."""
    prompt = "ROMEO:"
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, str(ROOT / "generate.py"), f"ckpt={ckpt}", f"prompt={prompt}", "max_new_tokens=50"]
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        got = b""
        while len(got) < len(prompt) + 1:  # the prompt is echoed first, then the tokens stream
            chunk = proc.stdout.read1(64)
            if not chunk:
                raise RuntimeError(f"generate.py ended early: {proc.stderr.read().decode()[-2000:]}")
            got += chunk
        times.append(time.perf_counter() - start)
        proc.communicate()
    return times


@hydra.main(version_base="1.3", config_path="../conf", config_name="bench_generate")
@exit_on_user_error
def main(args: DictConfig) -> None:
    results = ROOT / "bench" / "results"
    if min(args.new_tokens, args.repeats) < 1 or (args.threads is not None and args.threads < 1):
        raise ConfigError(
            f"new_tokens={args.new_tokens}, repeats={args.repeats}, threads={args.threads}: "
            "each must be >= 1 (threads may be null)"
        )
    if args.threads:
        torch.set_num_threads(args.threads)

    small_ckpt = random_checkpoint("small", Path(args.ckpt_dir or results))
    nano_ckpt = random_checkpoint("nano", Path(args.ckpt_dir or results))
    model, tokenizer = load_model(small_ckpt)
    prompt_ids = tokenizer.encode(PROMPT)
    n = args.new_tokens

    runs = [("cached", 1, True, False), ("uncached", 1, False, False), ("cached", 8, True, False)]
    if args.compile:
        runs.append(("cached+compile", 1, True, True))
    rows, tokens = [], {}
    for name, batch, use_cache, compile in runs:
        times, out = time_decoding(model, prompt_ids, batch, n, use_cache, args.repeats, compile)
        tokens[(name, batch)] = out
        # The best run is the least disturbed by anything else on the machine; the median is kept too.
        best, median = min(times), statistics.median(times)
        rows.append(
            {
                "mode": name,
                "batch": batch,
                "seconds": round(best, 3),
                "tokens_per_s": round(batch * n / best, 1),
                "median_tokens_per_s": round(batch * n / median, 1),
                "runs_seconds": [round(t, 3) for t in times],
            }
        )
    speed = {(r["mode"], r["batch"]): r["tokens_per_s"] for r in rows}
    first_token = time_to_first_token(nano_ckpt, args.repeats)

    result = {
        "date": datetime.date.today().isoformat(),
        "machine": describe(),
        "setup": {
            "model": "small (6 layers, 384 wide, block 256), random weights, 65-character vocabulary",
            "prompt_tokens": len(prompt_ids),
            "new_tokens": n,
            "sampling": "temperature 0.8, top_k 200",
            "repeats": args.repeats,
            "statistic": "best of the runs (tokens_per_s), median (median_tokens_per_s)",
        },
        "decoding": rows,
        "cached_over_uncached": round(speed[("cached", 1)] / speed[("uncached", 1)], 2),
        "batch8_over_batch1": round(speed[("cached", 8)] / speed[("cached", 1)], 2),
        "cached_equals_uncached_tokens": bool(torch.equal(tokens[("cached", 1)], tokens[("uncached", 1)])),
        "first_token_seconds_nano": {
            "best": round(min(first_token), 3),
            "median": round(statistics.median(first_token), 3),
            "runs": [round(t, 3) for t in first_token],
        },
    }

    print(f"on {summary(result['machine'])}")
    print(f"small model, {len(prompt_ids)}-token prompt, {n} new tokens, best of {args.repeats} runs")
    print(f"{'mode':<16}{'batch':>6}{'seconds':>10}{'tokens/s':>11}{'median tok/s':>14}")
    for r in rows:
        print(
            f"{r['mode']:<16}{r['batch']:>6}{r['seconds']:>10.2f}{r['tokens_per_s']:>11.1f}"
            f"{r['median_tokens_per_s']:>14.1f}"
        )
    print(f"cached / uncached (batch 1): {result['cached_over_uncached']:.1f}x")
    print(f"batch 8 / batch 1 (cached, tokens/s): {result['batch8_over_batch1']:.1f}x")
    first = result["first_token_seconds_nano"]
    print(f"start to first token, model=nano: best {first['best']:.2f} s, median {first['median']:.2f} s")
    out = Path(args.out or results / "generate.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    exit_on_user_error(main)()
