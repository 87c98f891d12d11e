"""Serving speed: serve.py under 1, 4, 16 and 32 concurrent streaming clients, beside a plain loop of
transformers' `generate` on the same weights.

python bench/bench_serve.py                        # table on stdout, JSON in bench/results/serve.json
python bench/bench_serve.py clients=[1,16] max_tokens=64 rounds=5    # knobs: conf/bench_serve.yaml

The model is `model=small` (6 layers, 384 wide, block 256) with rotary positions, so that it exports
as Llama, with random weights and the Tiny Shakespeare characters: it makes its own checkpoint and
export, no training needed, and a random model never ends an answer early, so every request is
max_tokens long. serve.py runs as a user starts it (a subprocess on 127.0.0.1, max_batch = the most
clients); each client is a thread streaming /v1/completions (greedy) with httpx and sending its
requests one after the other. Per run: aggregate tokens/s (every answer's tokens over the time from
the first request to the last answer), time to first token and time between tokens (p50, p95).
The transformers loop runs the 1-client requests one by one through `model.generate` (greedy, the
same prompts and lengths) in this process, a streamer timing its tokens.

One run of one client lasts about a second here, and this VM's speed drifts by 10 to 20% from one
second to the next, so a ratio of two single runs moves by as much. Every `round` runs each client
count and the transformers loop once, in turn, the order reversed every other round; the tables
give the median of the rounds, and each ratio is the median of the rounds' own ratios (two runs
of the same round, seconds apart).
"""

from __future__ import annotations

import datetime
import json
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import httpx
import hydra
import torch
from omegaconf import DictConfig

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_generate import SHAKESPEARE_CHARS  # noqa: E402
from machine import describe, summary  # noqa: E402
from model_presets import model_preset  # noqa: E402

from gpt.errors import ConfigError, exit_on_user_error  # noqa: E402
from gpt.model.transformer import GPT  # noqa: E402
from gpt.runs.checkpoint import save_weights_checkpoint  # noqa: E402
from gpt.tokenizer import CharTokenizer  # noqa: E402

PROMPTS = [
    "ROMEO:",
    "JULIET:\nO Romeo, Romeo",
    "First Citizen:\nBefore we proceed any further, hear me speak.",
]


def random_checkpoint(folder: Path) -> Path:
    """model=small with rotary positions and random weights (seeded), made once and reused."""
    path = folder / "small-rope-random.ckpt"
    if not path.is_file():
        tokenizer = CharTokenizer(SHAKESPEARE_CHARS)
        torch.manual_seed(0)
        model = GPT(replace(model_preset("small"), pos_emb="rope", vocab_size=tokenizer.vocab_size))
        save_weights_checkpoint(model, tokenizer, path)
    return path


def median_run(runs: list[dict]) -> dict:
    """Every number of the runs of one kind, as the median over the runs."""
    return {
        k: runs[0][k] if k == "tokens" else round(statistics.median(r[k] for r in runs), 3)
        for k in runs[0]
        if k != "clients"
    }


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def latency_summary(first: list[float], gaps: list[float]) -> dict[str, float]:
    """Milliseconds: p50 and p95 of the times to first token and of the times between tokens."""
    return {
        "ttft_p50_ms": round(1e3 * percentile(first, 0.5), 1),
        "ttft_p95_ms": round(1e3 * percentile(first, 0.95), 1),
        "itl_p50_ms": round(1e3 * percentile(gaps, 0.5), 2),
        "itl_p95_ms": round(1e3 * percentile(gaps, 0.95), 2),
    }


class Server:
    """serve.py on a free port of 127.0.0.1 until close()."""

    def __init__(self, ckpt: Path, max_batch: int) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        cmd = [sys.executable, str(ROOT / "serve.py"), f"ckpt={ckpt}", f"port={port}"]
        cmd += [f"max_batch={max_batch}", "max_queue=1024", "model_name=bench"]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"serve.py exited {self.proc.returncode}: {self.proc.stderr.read()[-2000:]}"
                )
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("serve.py did not answer /health in 120 s")
            time.sleep(0.2)

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def stream_one(
    client: httpx.Client, url: str, prompt: str, max_tokens: int
) -> tuple[float, list[float], int]:
    """One streamed completion: (seconds to the first token, seconds between tokens, tokens)."""
    body = {"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    start = time.perf_counter()
    times, tokens = [], 0
    with client.stream("POST", f"{url}/v1/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            text = json.loads(line[6:])["choices"][0]["text"]
            if text:
                times.append(time.perf_counter())
                tokens += len(text)  # a character model: one character per token
    return times[0] - start, [b - a for a, b in zip(times, times[1:], strict=False)], tokens


def run_clients(url: str, n: int, requests: int, max_tokens: int) -> dict[str, float]:
    """n threads, each streaming `requests` completions in turn: the aggregate and the latencies."""
    first, gaps, tokens, errors = [], [], [0], []
    lock = threading.Lock()

    def client(k: int) -> None:
        try:
            with httpx.Client(timeout=600) as c:
                for r in range(requests):
                    t0, g, t = stream_one(c, url, PROMPTS[(k + r) % len(PROMPTS)], max_tokens)
                    with lock:
                        first.append(t0)
                        gaps.extend(g)
                        tokens[0] += t
        except Exception as e:  # noqa: BLE001  reported after the run
            errors.append(repr(e))

    threads = [threading.Thread(target=client, args=(k,)) for k in range(n)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"{len(errors)} clients failed, first: {errors[0]}")
    expected = n * requests * max_tokens
    if tokens[0] != expected:
        raise RuntimeError(f"the answers held {tokens[0]} tokens, not {expected}")
    return (
        {"clients": n, "seconds": round(seconds, 3), "tokens": tokens[0]}
        | {"tokens_per_s": round(tokens[0] / seconds, 1)}
        | latency_summary(first, gaps)
    )


def load_transformers(ckpt: Path, folder: Path):  # noqa: ANN201 (transformers' model, tokenizer)
    """The checkpoint's Llama export (made once, in `folder`) loaded in transformers, and our tokenizer."""
    from transformers import AutoModelForCausalLM

    from gpt.interop.export import export
    from gpt.runs.checkpoint import load_model

    model, tokenizer = load_model(ckpt)
    hf_dir = folder / "small-rope-random-hf"
    if not (hf_dir / "config.json").is_file():
        export(model, tokenizer, hf_dir, "llama")
    return AutoModelForCausalLM.from_pretrained(hf_dir).eval(), tokenizer


def transformers_loop(hf, tokenizer, requests: int, max_tokens: int) -> dict[str, float]:  # noqa: ANN001
    """The 1-client requests through transformers' generate, one after the other, on the export."""
    from transformers.generation.streamers import BaseStreamer

    class Clock(BaseStreamer):
        def __init__(self) -> None:
            self.times: list[float] = []

        def put(self, value) -> None:
            self.times.append(time.perf_counter())

        def end(self) -> None:
            pass

    first, gaps, tokens = [], [], 0
    kw = dict(max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        warm = kw | {"max_new_tokens": 4, "min_new_tokens": 4}
        hf.generate(torch.tensor([tokenizer.encode(PROMPTS[0])]), **warm)  # warm-up
        start = time.perf_counter()
        for r in range(requests):
            clock = Clock()
            t0 = time.perf_counter()
            out = hf.generate(
                torch.tensor([tokenizer.encode(PROMPTS[r % len(PROMPTS)])]), streamer=clock, **kw
            )
            new = clock.times[1:]  # the first put is the prompt
            first.append(new[0] - t0)
            gaps.extend(b - a for a, b in zip(new, new[1:], strict=False))
            tokens += out.size(1) - len(tokenizer.encode(PROMPTS[r % len(PROMPTS)]))
        seconds = time.perf_counter() - start
    return {"seconds": round(seconds, 3), "tokens": tokens, "tokens_per_s": round(tokens / seconds, 1)} | (
        latency_summary(first, gaps)
    )


@hydra.main(version_base="1.3", config_path="../conf", config_name="bench_serve")
@exit_on_user_error
def main(args: DictConfig) -> None:
    clients = list(args.clients)
    if not clients or min(clients) < 1 or min(args.requests_per_client, args.max_tokens, args.rounds) < 1:
        raise ConfigError(
            f"clients={clients}, requests_per_client={args.requests_per_client}, "
            f"max_tokens={args.max_tokens}, rounds={args.rounds}: each must be >= 1 "
            "(clients: a non-empty list)"
        )
    folder = Path(args.ckpt_dir or ROOT / "bench" / "results")
    folder.mkdir(parents=True, exist_ok=True)
    ckpt = random_checkpoint(folder)

    hf = load_transformers(ckpt, folder) if args.transformers else None
    # Each round: every client count, then the transformers loop (None), reversed every other round.
    order: list[int | None] = [*clients, *([None] if hf else [])]
    rounds: list[dict[int | None, dict]] = []
    server = Server(ckpt, max(clients))
    try:
        run_clients(server.url, 1, 1, 8)  # warm-up
        for r in range(args.rounds):
            runs = {}
            for n in order if r % 2 == 0 else order[::-1]:
                if n is None:
                    runs[n] = transformers_loop(*hf, args.requests_per_client, args.max_tokens)
                else:
                    runs[n] = run_clients(server.url, n, args.requests_per_client, args.max_tokens)
            rounds.append(runs)
    finally:
        server.close()
    runs = [median_run([rnd[n] for rnd in rounds]) | {"clients": n} for n in clients]
    reference = median_run([rnd[None] for rnd in rounds]) if hf else None

    def ratios(n: int | None, over: int | None) -> list[float]:  # each round's own
        return [rnd[n]["tokens_per_s"] / rnd[over]["tokens_per_s"] for rnd in rounds]

    result = {
        "date": datetime.date.today().isoformat(),
        "machine": describe(),
        "setup": {
            "model": "small (6 layers, 384 wide, block 256), rotary positions, random weights, 65 characters",
            "max_tokens": args.max_tokens,
            "requests_per_client": args.requests_per_client,
            "sampling": "greedy",
            "server": f"serve.py max_batch={max(clients)}, streaming /v1/completions over httpx",
            "rounds": args.rounds,
            "statistic": "median of the rounds; ratios: median of each round's own ratio",
        },
        "serve": runs,
        "transformers_loop": reference,
        "rounds": [
            {"clients": {n: rnd[n] for n in clients}, "transformers_loop": rnd.get(None)} for rnd in rounds
        ],
    }
    if 1 in clients:
        scaling = {n: ratios(n, 1) for n in clients}
        result["scaling_over_one_client"] = {n: round(statistics.median(x), 2) for n, x in scaling.items()}
        result["scaling_over_one_client_by_round"] = {n: [round(v, 2) for v in x] for n, x in scaling.items()}
        if reference:
            mine = ratios(1, None)
            result["one_client_over_transformers"] = round(statistics.median(mine), 2)
            result["one_client_over_transformers_by_round"] = [round(v, 2) for v in mine]

    print(f"on {summary(result['machine'])}")
    print(f"{result['setup']['model']}; {args.max_tokens} tokens per answer, greedy")
    print(f"median of {args.rounds} rounds; ratios: median of the rounds' own (each round's in brackets)")
    print(f"{'':<22}{'tokens/s':>10}{'TTFT p50':>10}{'p95':>8}{'ITL p50':>10}{'p95':>8}  (ms)")
    rows = [(f"serve.py, {r['clients']} clients", r) for r in runs]
    if reference:
        rows.append(("transformers loop", reference))
    for name, r in rows:
        print(
            f"{name:<22}{r['tokens_per_s']:>10.1f}{r['ttft_p50_ms']:>10.1f}{r['ttft_p95_ms']:>8.1f}"
            f"{r['itl_p50_ms']:>10.2f}{r['itl_p95_ms']:>8.2f}"
        )
    for n, x in result.get("scaling_over_one_client", {}).items():
        if n != 1:
            each = ", ".join(f"{v:.1f}" for v in result["scaling_over_one_client_by_round"][n])
            print(f"{n} clients / 1 client (aggregate tokens/s): {x:.1f}x ({each})")
    if "one_client_over_transformers" in result:
        each = ", ".join(f"{v:.2f}" for v in result["one_client_over_transformers_by_round"])
        mine = result["one_client_over_transformers"]
        print(f"serve.py at 1 client / transformers loop: {mine:.2f}x ({each})")
    out = Path(args.out or ROOT / "bench" / "results" / "serve.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    exit_on_user_error(main)()
