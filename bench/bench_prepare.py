"""Benchmark the prepare step: a generated corpus of >= 200 MB, GPT-2's BPE (r50k_base).

python bench/bench_prepare.py                       # 200 MB, all cores, verify every document
python bench/bench_prepare.py mb=50 workers=1 verify=500     # knobs: conf/bench_prepare.yaml

The corpus is built in a temporary folder (removed at the end) from Tiny Shakespeare's lines,
shuffled into documents of 1-16 KB (shorter than data.doc_chars, so never cut): half as one .txt
file per document in nested folders, half as .jsonl files of many documents. It is prepared in a
child process, so that the peak memory measured (the child's maximum resident set) is the prepare
step's alone. Then every document's tokens (or verify=N of them) are checked against a direct
encode of that document, and every document must appear exactly once across train and val.
Prints a summary; writes JSON to `out`.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import tiktoken

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from machine import describe, summary  # noqa: E402

from gpt.config import DataConfig  # noqa: E402
from gpt.data.prepare import Prepared, prepare  # noqa: E402
from gpt.data.sources import data_root, find_shakespeare  # noqa: E402
from gpt.errors import ConfigError, exit_on_user_error  # noqa: E402

if TYPE_CHECKING:
    from omegaconf import DictConfig


def digest(text: str) -> bytes:
    return hashlib.sha1(text.encode("utf-8")).digest()


def generate(folder: Path, total_bytes: int, seed: int) -> dict[bytes, int]:
    """Write the corpus; returns how many times each document (by digest) was written."""
    lines = [line for line in find_shakespeare(data_root(DataConfig())).read_text().splitlines() if line]
    rng = random.Random(seed)
    docs: dict[bytes, int] = {}
    written, n = 0, 0
    rows = None
    (folder / "web").mkdir(parents=True)
    while written < total_bytes:
        text = "\n".join(rng.choices(lines, k=rng.randint(30, 400))) + "\n"
        docs[digest(text)] = docs.get(digest(text), 0) + 1
        if n % 2 == 0:
            path = folder / "books" / f"{n % 97:02d}" / f"{n:07d}.txt"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
        else:
            if rows is None or rows.tell() > 10_000_000:
                if rows is not None:
                    rows.close()
                rows = open(folder / "web" / f"part-{n:07d}.jsonl", "w", encoding="utf-8")  # noqa: SIM115
            rows.write(json.dumps({"id": n, "text": text}) + "\n")
        written += len(text.encode("utf-8"))
        n += 1
    if rows is not None:
        rows.close()
    return docs


def corpus_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def child(corpus: str, cache: str, workers: int | None) -> None:
    """Run in a subprocess: prepare, print the wall and CPU seconds it took as JSON."""
    cfg = DataConfig(
        source="text", path=corpus, tokenizer="r50k_base", cache_dir=cache, prepare_workers=workers
    )
    t0, c0 = time.perf_counter(), time.process_time()
    prepared = prepare(cfg)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0  # cpu: all threads
    print(json.dumps({"seconds": seconds, "cpu_seconds": cpu, "dir": str(prepared.dir)}))


def verify(prepared: Prepared, docs: dict[bytes, int], sample: int | None, seed: int) -> int:
    """Each segment between end-of-text tokens is one document, equal to its direct encode."""
    enc = tiktoken.get_encoding("r50k_base")
    eot = enc.eot_token
    segments = []
    for split in ("train", "val"):
        ids = np.concatenate(
            [np.fromfile(p, dtype=prepared.meta["dtype"]) for p in prepared.shard_paths(split)]
        )
        cuts = np.flatnonzero(ids == eot).tolist()
        bounds = zip([-1, *cuts], [*cuts, len(ids)], strict=True)
        segments += [ids[a + 1 : b] for a, b in bounds]
    seen: dict[bytes, int] = {}
    texts = [enc.decode(s.tolist()) for s in segments]
    for text in texts:
        seen[digest(text)] = seen.get(digest(text), 0) + 1
    assert seen == docs, "the shards do not hold each generated document exactly once"
    chosen = range(len(segments))
    if sample is not None and sample < len(segments):
        chosen = sorted(random.Random(seed).sample(range(len(segments)), sample))
    for start in range(0, len(chosen), 512):
        batch = chosen[start : start + 512]
        direct = enc.encode_ordinary_batch([texts[i] for i in batch], num_threads=os.cpu_count() or 1)
        for i, want in zip(batch, direct, strict=True):
            assert segments[i].tolist() == want, f"document {i}: shard tokens differ from a direct encode"
    return len(chosen)


def main(args: DictConfig) -> None:
    if not args.mb > 0 or (args.workers is not None and args.workers < 1) or (args.verify or 0) < 0:
        raise ConfigError(
            f"mb={args.mb}, workers={args.workers}, verify={args.verify}: "
            "mb must be > 0, workers >= 1 (or null), verify >= 0 (or null)"
        )
    tmp = Path(tempfile.mkdtemp(prefix="bench-prepare-"))
    try:
        t0 = time.perf_counter()
        docs = generate(tmp / "corpus", int(args.mb * 1e6), args.seed)
        size = corpus_bytes(tmp / "corpus")
        print(
            f"generated {size / 1e6:.1f} MB, {sum(docs.values()):,} documents "
            f"in {time.perf_counter() - t0:.1f} s"
        )

        cmd = [
            sys.executable,
            __file__,
            "--child",
            *map(str, (tmp / "corpus", tmp / "cache", args.workers or 0)),
        ]
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True)
        peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # KiB on Linux
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        prepared = Prepared(Path(result["dir"]), json.loads((Path(result["dir"]) / "meta.json").read_text()))
        meta = prepared.meta
        tokens = meta["train_tokens"] + meta["val_tokens"]

        t1 = time.perf_counter()
        checked = verify(prepared, docs, args.verify, args.seed)
        report = {
            "corpus_mb": round(size / 1e6, 1),
            "documents": sum(docs.values()),
            "tokens": tokens,
            "seconds": round(result["seconds"], 2),
            "mb_per_s": round(size / 1e6 / result["seconds"], 2),
            "tokens_per_s": round(tokens / result["seconds"]),
            "peak_rss_mb": round(peak_mb, 1),
            # CPU time is less perturbed than wall time by other load on a shared machine.
            "cpu_seconds": round(result["cpu_seconds"], 2),
            "mb_per_cpu_s": round(size / 1e6 / result["cpu_seconds"], 2),
            "verified_documents": checked,
            "verify_seconds": round(time.perf_counter() - t1, 1),
            "workers": args.workers or len(os.sched_getaffinity(0)),
            "cpus": len(os.sched_getaffinity(0)),
            "machine": describe(),
            "tiktoken": tiktoken.__version__ if hasattr(tiktoken, "__version__") else "?",
            "date": time.strftime("%Y-%m-%d"),
        }
        print(
            f"prepare: {report['corpus_mb']} MB, {tokens:,} tokens in {report['seconds']} s = "
            f"{report['mb_per_s']} MB/s ({report['tokens_per_s'] / 1e6:.2f}M tokens/s) on "
            f"{report['workers']} threads; peak memory {report['peak_rss_mb']:.0f} MB; "
            f"{checked:,} documents equal a direct encode; {report['mb_per_cpu_s']} MB per CPU-second; "
            f"on {summary(report['machine'])}"
        )
        out = Path(args.out or ROOT / "bench" / "results" / "prepare.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {out}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:  # the measured process: without Hydra in its memory, as before
        child(sys.argv[2], sys.argv[3], int(sys.argv[4]) or None)
    else:
        import hydra

        command = hydra.main(version_base="1.3", config_path="../conf", config_name="bench_prepare")
        exit_on_user_error(command(exit_on_user_error(main)))()
