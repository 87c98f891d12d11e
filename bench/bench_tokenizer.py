"""Benchmark data.tokenizer=train: a byte-level BPE trained on ~100 MB of Python, encoded by tiktoken.

python bench/bench_tokenizer.py                            # 100 MB, 16,384 tokens, GPT-4's pattern
python bench/bench_tokenizer.py mb=20 vocab_size=8192 repeats=1    # knobs: conf/bench_tokenizer.yaml

The corpus is the Python standard library's own sources (every UTF-8 `*.py` under
sysconfig.get_paths()["stdlib"], site-packages left out), in sorted order: every `holdout`-th file is
held out, the others are concatenated, over again if needed, into `mb` MB of training text (written
to a temporary folder as one file per source file). Training runs in a child process, which reads
those files as the prepare step reads a folder (gpt.data.encode.iter_parts) and streams them into the
trainer (gpt.bpe.train_bpe), so that the peak memory measured (the child's maximum resident set) is
the training's alone; `repeats` times, each giving the same ranks (checked byte for byte). Then, in
this process: the speed of encoding the training text with the trained ranks beside r50k_base's (one
thread, and one per core as the prepare step encodes), bytes per token on the held-out files (trained,
r50k_base, cl100k_base where tiktoken's cache holds it), decode(encode(text)) == text for every file,
and Hugging Face's tokenizer built from the ranks (an export's tokenizer.json) giving tiktoken's ids on
the held-out files. Prints a summary; writes JSON to `out`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import tiktoken
import tokenizers

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from machine import describe, summary  # noqa: E402

from gpt.bpe import hf_tokenizer, train_bpe  # noqa: E402
from gpt.config import BPE_PATTERNS, ENDOFTEXT, DataConfig  # noqa: E402
from gpt.data.encode import iter_parts  # noqa: E402
from gpt.data.sources import find_files  # noqa: E402
from gpt.errors import ConfigError, exit_on_user_error  # noqa: E402
from gpt.tokenizer import BPETokenizer, get_encoding, tokenizer_from_dict  # noqa: E402

if TYPE_CHECKING:
    from omegaconf import DictConfig


def stdlib_sources() -> list[tuple[str, str]]:
    """(relative path, text) of every UTF-8 `.py` file of the standard library, in sorted order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if {"site-packages", "dist-packages"} & set(rel.parts):
            continue
        try:
            out.append((rel.as_posix(), path.read_bytes().decode("utf-8")))
        except (UnicodeDecodeError, OSError):  # a few test files are Latin-1 on purpose
            continue
    return out


def write_corpus(folder: Path, sources: list[tuple[str, str]], total_bytes: int) -> int:
    """The training files, copied over again (copy-0/, copy-1/, ...) until they hold total_bytes;
    returns the bytes written."""
    written, copy = 0, 0
    while written < total_bytes:
        for rel, text in sources:
            path = folder / f"copy-{copy}" / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
            written += len(text.encode("utf-8"))
            if written >= total_bytes:
                break
        copy += 1
    return written


def child(corpus: str, vocab_size: int, pattern: str, out: str) -> None:
    """Run in a subprocess: train on the corpus folder, print the seconds it took as JSON and write
    the tokenizer's description to `out`."""
    cfg = DataConfig(source="text", path=corpus, include=["*.py"], exclude=[])
    t0 = time.perf_counter()
    texts = (part.text for part in iter_parts(cfg, find_files(cfg), lambda n: None))
    tok = train_bpe(texts, vocab_size, pattern, [ENDOFTEXT])
    seconds = time.perf_counter() - t0
    Path(out).write_text(json.dumps(tok.to_dict()))
    print(json.dumps({"seconds": seconds, "cpu_seconds": time.process_time()}))


def train(corpus: Path, args: DictConfig, tmp: Path) -> tuple[BPETokenizer, list[dict]]:
    """`repeats` trainings, each in a child process; the tokenizer, and each run's seconds and peak
    memory. Every run must give byte-identical ranks."""
    runs, digests, description = [], set(), None
    for i in range(args.repeats):
        out = tmp / f"tokenizer-{i}.json"
        cmd = [sys.executable, __file__, "--child", str(corpus), str(args.vocab_size), args.pattern, str(out)]
        with open(tmp / "child.out", "w+") as stdout:
            proc = subprocess.Popen(cmd, stdout=stdout)
            # wait4: this child's own resource usage (RUSAGE_CHILDREN would give the largest child's).
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
            if proc.returncode != 0:
                raise subprocess.CalledProcessError(proc.returncode, cmd)
            stdout.seek(0)
            result = json.loads(stdout.read().strip().splitlines()[-1])
        peak_mb = usage.ru_maxrss / 1024  # KiB on Linux
        text = out.read_text()
        digests.add(hashlib.sha256(text.encode()).hexdigest())
        description = json.loads(text)
        runs.append(
            {
                "seconds": round(result["seconds"], 2),
                "cpu_seconds": round(result["cpu_seconds"], 2),
                "peak_rss_mb": round(peak_mb),
            }
        )
        print(f"trained in {result['seconds']:.1f} s (peak memory {peak_mb:,.0f} MB)", flush=True)
    assert len(digests) == 1, "two trainings on the same corpus gave different tokenizers"
    return tokenizer_from_dict(description), runs


def encode_speed(enc: tiktoken.Encoding, texts: list[str], threads: int, repeats: int = 3) -> float:
    """MB/s of encoding every text (best of `repeats`), as the prepare step encodes: encode_to_numpy,
    special-token text as ordinary text, on `threads` threads (tiktoken releases the GIL)."""
    size = sum(len(t.encode("utf-8")) for t in texts)
    encode = lambda t: enc.encode_to_numpy(t, disallowed_special=())  # noqa: E731
    best = float("inf")
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(repeats):
            t0 = time.perf_counter()
            if threads == 1:
                for t in texts:
                    encode(t)
            else:
                for _ in pool.map(encode, texts, chunksize=64):
                    pass
            best = min(best, time.perf_counter() - t0)
    return size / 1e6 / best


def compression(tok: BPETokenizer, held: list[str]) -> dict[str, float]:
    """Bytes per token of the held-out files: the trained vocabulary's, and r50k_base's and
    cl100k_base's (where tiktoken's cache holds it)."""
    encodings = {tok.name: tok.enc, "r50k_base": get_encoding("r50k_base")}
    with contextlib.suppress(Exception):  # not in tiktoken's cache: left out
        encodings["cl100k_base"] = get_encoding("cl100k_base", download=False)
    size = sum(len(t.encode("utf-8")) for t in held)
    return {
        name: round(size / sum(len(enc.encode_ordinary(t)) for t in held), 4)
        for name, enc in encodings.items()
    }


def measure(tok: BPETokenizer, training: list[str], held: list[str], every: list[str]) -> dict:
    """Encoding speed, compression, round trips and Hugging Face parity of the trained tokenizer."""
    threads = sorted({1, len(os.sched_getaffinity(0))})
    r50k = get_encoding("r50k_base")
    speed = {
        f"{name}_{n}_threads": round(encode_speed(enc, training, n), 2)
        for name, enc in ((tok.name, tok.enc), ("r50k_base", r50k))
        for n in threads
    }
    per_token = compression(tok, held)
    round_trips = sum(tok.decode(tok.encode(text)) == text for text in every)
    assert round_trips == len(every), "decode(encode(text)) != text for some file"
    hf_equal = sum(
        a.ids == tok.encode(t) for a, t in zip(hf_tokenizer(tok).encode_batch(held), held, strict=True)
    )
    return {
        "encode_mb_per_s": speed,
        "encode_vs_r50k": {
            n: round(speed[f"{tok.name}_{n}_threads"] / speed[f"r50k_base_{n}_threads"], 3) for n in threads
        },
        "held_out_bytes_per_token": per_token,
        "vs_r50k": round(per_token[tok.name] / per_token["r50k_base"], 3),
        "round_trips": f"{round_trips}/{len(every)}",
        "hf_parity_files": f"{hf_equal}/{len(held)}",
    }


def main(args: DictConfig) -> None:
    if not args.mb > 0 or args.repeats < 1 or args.holdout < 2 or args.pattern not in BPE_PATTERNS:
        raise ConfigError(
            f"mb={args.mb}, repeats={args.repeats}, holdout={args.holdout}, pattern={args.pattern}: mb must "
            f"be > 0, repeats >= 1, holdout >= 2, pattern one of {', '.join(BPE_PATTERNS)}"
        )
    sources = stdlib_sources()
    held = [text for i, (_, text) in enumerate(sources) if i % args.holdout == 0]
    kept = [(rel, text) for i, (rel, text) in enumerate(sources) if i % args.holdout != 0]
    tmp = Path(tempfile.mkdtemp(prefix="bench-tokenizer-"))
    try:
        size = write_corpus(tmp / "corpus", kept, int(args.mb * 1e6))
        unique = sum(len(t.encode("utf-8")) for _, t in kept)
        held_mb = sum(len(t.encode("utf-8")) for t in held) / 1e6
        print(
            f"corpus: {size / 1e6:.1f} MB of training text (from {unique / 1e6:.1f} MB in {len(kept):,} "
            f"stdlib files, repeated as needed), {held_mb:.1f} MB held out ({len(held):,} files)",
            flush=True,
        )
        tok, runs = train(tmp / "corpus", args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    best = min(r["seconds"] for r in runs)
    report = {
        "corpus_mb": round(size / 1e6, 1),
        "unique_mb": round(unique / 1e6, 1),
        "held_out_mb": round(held_mb, 2),
        "vocab_size": tok.vocab_size,
        "pattern": args.pattern,
        "train_seconds": best,
        "train_seconds_spread": round(max(r["seconds"] for r in runs) - best, 2),
        "train_mb_per_s": round(size / 1e6 / best, 2),
        "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
        "runs": runs,
        "identical_ranks": True,
        **measure(tok, [t for _, t in kept], held, [t for _, t in sources]),
        "machine": describe(),
        "tokenizers": tokenizers.__version__,
        "tiktoken": tiktoken.__version__ if hasattr(tiktoken, "__version__") else "?",
        "date": time.strftime("%Y-%m-%d"),
    }
    per_token = report["held_out_bytes_per_token"]
    print(
        f"tokenizer: {tok.vocab_size:,} tokens trained on {report['corpus_mb']} MB in {best:.1f} s (spread "
        f"{report['train_seconds_spread']} s over {len(runs)}, peak memory {report['peak_rss_mb']:,} MB, "
        f"identical ranks); encoding {report['encode_mb_per_s'][f'{tok.name}_1_threads']} MB/s on 1 thread "
        f"({report['encode_vs_r50k'][1]}x r50k_base's); held-out bytes per token {per_token[tok.name]} vs "
        f"r50k_base {per_token['r50k_base']} ({report['vs_r50k']}x); round trips {report['round_trips']}; "
        f"Hugging Face ids equal on {report['hf_parity_files']} held-out files; "
        f"on {summary(report['machine'])}"
    )
    out = Path(args.out or ROOT / "bench" / "results" / "tokenizer.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:  # the measured process: without Hydra in its memory
        child(sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5])
    else:
        import hydra

        command = hydra.main(version_base="1.3", config_path="../conf", config_name="bench_tokenizer")
        exit_on_user_error(command(exit_on_user_error(main)))()
