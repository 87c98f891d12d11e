"""The evaluate.py command (also `python -m gpt.evaluate`): one task on one checkpoint, a table on
stdout, and the results as <run dir>/evals/<name>.json (with each example's outputs beside it as
<name>.jsonl), where `python compare.py` finds them. Bad input is refused before anything is written.

The tasks: generate (complete prompt -> completion pairs with each decoding method; exact match,
chrF, BLEU), hellaswag and mc (multiple choice by log-likelihood, as lm-evaluation-harness scores it;
acc, acc_norm) and bpb (bits per byte, loss and perplexity on a corpus's validation windows)."""

from __future__ import annotations

import contextlib
import sys
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch

from gpt.config import DataConfig, DecodeConfig, EvaluateConfig
from gpt.data.sources import data_root
from gpt.errors import UserError
from gpt.evaluate.bpb import bpb_data, bpb_windows
from gpt.evaluate.choice import hellaswag_file
from gpt.evaluate.decode import default_max_new_tokens
from gpt.evaluate.examples import encode_examples
from gpt.evaluate.metrics import METRICS
from gpt.evaluate.results import write_json, write_jsonl
from gpt.evaluate.tasks import (
    pair_files,
    prompt_template,
    read_choice_examples,
    read_pairs,
    score,
    task_metrics,
)
from gpt.runs.checkpoint import (
    checkpoint_data_format,
    describe_checkpoint,
    find_checkpoint,
    load_model,
    read_checkpoint,
    resolve_device,
)


def saved_data_format(path: Path) -> dict[str, Any] | None:
    """The prompt format a checkpoint was trained with, read before its weights are (so that a bad
    row is found first), or None: a checkpoint of plain text, an older one, a Hugging Face dir."""
    return None if path.is_dir() else checkpoint_data_format(read_checkpoint(path, mmap=True), path)


def run_dir_of(checkpoint: Path) -> Path:
    """The run a checkpoint belongs to (runs/x for runs/x/checkpoints/last.ckpt), else its folder."""
    if checkpoint.is_dir():
        return checkpoint
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent


def check_out(out: Path) -> None:
    """A folder we can create or write into: refused before anything is generated."""
    existing = next(p for p in (out, *out.parents) if p.exists())
    if not existing.is_dir():
        raise UserError(f"out={out}: {existing} is a file; pass a folder to write the evaluation into")


def stem(path: Path) -> str:
    """A file's name without its suffixes (test.jsonl.gz: test), a folder's name as it is."""
    name = path.name.removesuffix(".gz")
    return (Path(name).stem if path.suffix else name) or "eval"


def format_table(metrics: dict[str, dict[str, float]]) -> str:
    """Metric x method, percentages with two decimals."""
    methods = list(metrics)
    width = max(len(m) for m in METRICS)
    cols = [max(len(m), 7) for m in methods]
    lines = ["  ".join([f"{'metric':<{width}}", *(f"{m:>{c}}" for m, c in zip(methods, cols, strict=True))])]
    for name in METRICS:
        cells = (f"{metrics[m][name]:>{c}.2f}" for m, c in zip(methods, cols, strict=True))
        lines.append("  ".join([f"{name:<{width}}", *cells]))
    return "\n".join(lines)


def decode_settings(cfg: DecodeConfig) -> DecodeConfig:
    """The DecodeConfig part of a config (evaluate.py's EvaluateConfig is one, with more keys)."""
    return DecodeConfig(**{f.name: getattr(cfg, f.name) for f in fields(DecodeConfig)})


@dataclass
class Result:
    """What a task returns: its metrics (a flat mapping), the table printed, what the JSON says of
    the evaluation besides (data, examples, settings) and each example's outputs, if any."""

    metrics: dict[str, float]
    table: str
    info: dict[str, Any]
    records: list[dict[str, Any]] | None = None


def result_name(cfg: EvaluateConfig, path: Path) -> str:
    """The results' file name (without suffix) in evals/: the task, what it ran on when that is not
    the task's own data, and the checkpoint when it is not the run's last one. So a task evaluated
    again on the same data and checkpoint replaces its results, and nothing else does."""
    parts = [cfg.task]
    data = cfg.data
    if data is not None and data.path:
        parts.append(stem(Path(data.path)))
    elif data is not None:
        parts.append(data.source)  # a named corpus (bpb data=shakespeare)
    if cfg.task == "bpb" and cfg.windows != "val":
        parts.append(cfg.windows)
    if path.is_file() and path.name != "last.ckpt":
        parts.append(path.stem)
    return "-".join(parts)


def run_generate(cfg: EvaluateConfig, path: Path, device: torch.device) -> Result:
    """task=generate: complete the pairs' prompts with each decoding method, scored."""
    assert cfg.data is not None  # EvaluateConfig checks it
    files = pair_files(cfg.data)
    template, template_name = prompt_template(cfg.data.template, saved_data_format(path))
    rows = read_pairs(cfg.data, files, template, cfg.limit)
    if not rows:
        raise UserError(f"data.path {cfg.data.path} holds no examples; each line must be one JSON pair")
    model, tokenizer = load_model(path, device=device, dtype=getattr(torch, cfg.dtype))
    examples = encode_examples(rows, tokenizer)
    # Only now: bad input ends in its one line (before this, nothing but errors is printed).
    print(f"checkpoint: {describe_checkpoint(path)}", file=sys.stderr)
    if tokenizer.eot_token is None:
        print(
            "note: this checkpoint's tokenizer has no end-of-text token, so every generation runs "
            "max_new_tokens tokens",
            file=sys.stderr,
        )
    settings = decode_settings(cfg)
    if settings.max_new_tokens is None:
        settings = replace(settings, max_new_tokens=default_max_new_tokens(examples, model.config.block_size))
    print(
        f"evaluating {len(examples)} examples of {cfg.data.path}, template {template_name}, "
        f"max_new_tokens {settings.max_new_tokens}",
        file=sys.stderr,
    )
    scored = score("generate", model, tokenizer, examples, settings, progress=True)
    info = {
        "data": str(cfg.data.path),
        "examples": len(examples),
        "template": template_name,
        "settings": asdict(settings),
    }
    by_method: dict[str, dict[str, float]] = {}
    for name, value in scored.sums.items():
        method, metric = name.split("/")
        by_method.setdefault(method, {})[metric] = value
    return Result(scored.sums, format_table(by_method), info, scored.records)


def decoder_only(task: str, model: torch.nn.Module, path: Path) -> None:
    """Refuse a likelihood task (text, or choices after a context) for an encoder-decoder, which
    models a completion given a prompt, not text."""
    if model.config.arch == "encoder_decoder":
        raise UserError(
            f"task={task} scores text with a decoder-only model's likelihoods; {path} is an "
            "encoder_decoder model: evaluate it with task=generate on prompt -> completion pairs"
        )


def run_choice(cfg: EvaluateConfig, path: Path, device: torch.device) -> Result:
    """task=hellaswag or mc: each choice's log-likelihood after the context; acc and acc_norm."""
    if cfg.task == "hellaswag" and cfg.data is None:
        file = hellaswag_file(data_root(DataConfig()))
    else:
        assert cfg.data is not None  # EvaluateConfig checks it for mc
        file = Path(cfg.data.path)
        if not file.is_file():
            rows = "HellaSwag's rows" if cfg.task == "hellaswag" else "multiple-choice rows"
            raise UserError(f"data.path {file} is not a file; pass a .jsonl file of {rows}")
    names = cfg.data.fields if cfg.task == "mc" else None
    examples = read_choice_examples(cfg.task, file, names, cfg.limit)
    model, tokenizer = load_model(path, device=device, dtype=getattr(torch, cfg.dtype))
    decoder_only(cfg.task, model, path)
    print(f"checkpoint: {describe_checkpoint(path)}", file=sys.stderr)
    print(f"evaluating {len(examples)} examples of {file}", file=sys.stderr)
    scored = score(cfg.task, model, tokenizer, examples, decode_settings(cfg), progress=True)
    metrics = task_metrics(cfg.task, scored.sums)
    chance = 100 * sum(1 / len(e.choices) for e in examples) / len(examples)
    table = format_rows([*metrics.items(), ("chance", chance)])
    info = {"data": str(file), "examples": len(examples), "chance": chance, "batch_size": cfg.batch_size}
    return Result(metrics, table, info, scored.records)


def run_bpb(cfg: EvaluateConfig, path: Path, device: torch.device) -> Result:
    """task=bpb: bits per byte (and loss, perplexity) over the windows of a corpus's val split."""
    ckpt = None if path.is_dir() else read_checkpoint(path, mmap=True)
    data = bpb_data(cfg.data, ckpt, path)
    model, tokenizer = load_model(path, device=device, dtype=getattr(torch, cfg.dtype))
    decoder_only(cfg.task, model, path)
    with contextlib.redirect_stdout(sys.stderr):  # the prepare step's progress: stdout holds the table
        windows = bpb_windows(data, tokenizer, model.config.block_size, cfg.windows, cfg.limit, progress=True)
    print(f"checkpoint: {describe_checkpoint(path)}", file=sys.stderr)
    corpus = data.path or data.source
    what = "the checkpoint's training data, " if cfg.data is None else ""
    print(f"evaluating {len(windows)} {cfg.windows} windows of {what}{corpus}", file=sys.stderr)
    sums = score("bpb", model, tokenizer, windows, decode_settings(cfg), progress=True).sums
    metrics = task_metrics("bpb", sums)
    info = {
        "data": str(corpus),
        "windows": cfg.windows,
        "examples": int(sums["windows"]),
        "tokens": int(sums["tokens"]),
        "bytes": int(sums["bytes"]),
        "block_size": model.config.block_size,
    }
    return Result(metrics, format_rows(list(metrics.items())), info)


TASKS = {"generate": run_generate, "hellaswag": run_choice, "mc": run_choice, "bpb": run_bpb}


def format_rows(rows: list[tuple[str, float]]) -> str:
    """A metric per line: bpb and loss with four decimals, percentages and perplexity with two."""
    width = max(len("metric"), *(len(name) for name, _ in rows))
    lines = [f"{'metric':<{width}}  value"]
    lines += [f"{n:<{width}}  {v:.{4 if n in ('bpb', 'loss') else 2}f}" for n, v in rows]
    return "\n".join(lines)


def evaluate_checkpoint(cfg: EvaluateConfig) -> dict[str, float]:
    """What evaluate.py does; returns the metrics (flat: generate's are named method/metric)."""
    device = resolve_device(cfg.device)
    path = find_checkpoint(cfg.ckpt, cfg.runs_dir)
    out = Path(cfg.out) if cfg.out else run_dir_of(path) / "evals"
    check_out(out)
    result = TASKS[cfg.task](cfg, path, device)
    print(result.table)
    name = result_name(cfg, path)
    summary = out / f"{name}.json"
    step = None if path.is_dir() else read_checkpoint(path, mmap=True).get("global_step")
    written = []
    if result.records is not None:
        write_jsonl(out / f"{name}.jsonl", result.records)
        written.append(f"{out / f'{name}.jsonl'} ({len(result.records)} examples)")
    write_json(
        summary,
        {"task": cfg.task, "checkpoint": str(path), "step": step, **result.info, "metrics": result.metrics},
    )
    print(f"wrote {' and '.join([*written, str(summary)])}", file=sys.stderr)
    return result.metrics
