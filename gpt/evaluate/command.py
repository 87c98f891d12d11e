"""The evaluate.py command (also `python -m gpt.evaluate`): one task on one checkpoint, a table on
stdout, and the results as <run dir>/evals/<name>.json (with each example's outputs beside it as
<name>.jsonl), where `python compare.py` finds them. Bad input is refused before anything is written.

The tasks: generate (complete prompt -> completion pairs with each decoding method; exact match,
chrF, BLEU), hellaswag and mc (multiple choice by log-likelihood, as lm-evaluation-harness scores it;
acc, acc_norm) and bpb (bits per byte, loss and perplexity on a corpus's validation windows)."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields, replace
from itertools import islice
from pathlib import Path
from typing import Any

import torch

from gpt.config import FROM_CHECKPOINT, DataConfig, DecodeConfig, EvaluateConfig
from gpt.data.pairs import Template, get_template, read_examples, template_of
from gpt.data.sources import data_root, find_files
from gpt.errors import UserError
from gpt.evaluate.bpb import bpb_data, bpb_metrics, bpb_windows, score_bpb
from gpt.evaluate.choice import (
    choice_metrics,
    choice_sums,
    hellaswag_file,
    read_choices,
    read_hellaswag,
    score_choices,
)
from gpt.evaluate.decode import default_max_new_tokens, evaluate
from gpt.evaluate.examples import encode_examples
from gpt.evaluate.metrics import METRICS
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


def prompt_template(spec: str, fmt: dict[str, Any] | None) -> tuple[Template, str]:
    """(template, how to name it): data.template as given, or for `checkpoint` the checkpoint's own
    (plain when it saved none)."""
    if spec != FROM_CHECKPOINT:
        return get_template(spec), spec
    if fmt is not None:
        return template_of(fmt), f"{fmt.get('template', 'custom')} (the checkpoint's)"
    return get_template("plain"), "plain (the checkpoint saved none)"


def pair_files(cfg: DataConfig) -> list[Path]:
    path = Path(cfg.path)
    if not path.exists():
        raise UserError(
            f"data.path {str(path)!r} does not exist; pass a .jsonl file of prompt -> completion pairs "
            "(or a folder of them)"
        )
    return find_files(cfg)


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


def write_jsonl(path: Path, records: Iterable[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


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
    rows = list(islice(read_examples(cfg.data, files, template), cfg.limit))
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
    metrics, records = evaluate(model, tokenizer, examples, settings, progress=True)
    info = {
        "data": str(cfg.data.path),
        "examples": len(examples),
        "template": template_name,
        "settings": asdict(settings),
    }
    flat = {f"{method}/{name}": value for method, scores in metrics.items() for name, value in scores.items()}
    return Result(flat, format_table(metrics), info, records)


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
    examples = read_hellaswag(file) if cfg.task == "hellaswag" else read_choices(file, cfg.data.fields)
    examples = examples[: cfg.limit]
    model, tokenizer = load_model(path, device=device, dtype=getattr(torch, cfg.dtype))
    print(f"checkpoint: {describe_checkpoint(path)}", file=sys.stderr)
    print(f"evaluating {len(examples)} examples of {file}", file=sys.stderr)
    records = score_choices(model, tokenizer, examples, cfg.batch_size, progress=True)
    metrics = choice_metrics(choice_sums(records))
    chance = 100 * sum(1 / len(e.choices) for e in examples) / len(examples)
    table = format_rows([*metrics.items(), ("chance", chance)])
    info = {"data": str(file), "examples": len(examples), "chance": chance, "batch_size": cfg.batch_size}
    return Result(metrics, table, info, records)


def run_bpb(cfg: EvaluateConfig, path: Path, device: torch.device) -> Result:
    """task=bpb: bits per byte (and loss, perplexity) over the windows of a corpus's val split."""
    ckpt = None if path.is_dir() else read_checkpoint(path, mmap=True)
    data = bpb_data(cfg.data, ckpt, path)
    model, tokenizer = load_model(path, device=device, dtype=getattr(torch, cfg.dtype))
    with contextlib.redirect_stdout(sys.stderr):  # the prepare step's progress: stdout holds the table
        windows = bpb_windows(data, tokenizer, model.config.block_size, cfg.windows, cfg.limit, progress=True)
    print(f"checkpoint: {describe_checkpoint(path)}", file=sys.stderr)
    corpus = data.path or data.source
    what = "the checkpoint's training data, " if cfg.data is None else ""
    print(f"evaluating {len(windows)} {cfg.windows} windows of {what}{corpus}", file=sys.stderr)
    sums = score_bpb(model, tokenizer, windows, cfg.batch_size, progress=True)
    metrics = bpb_metrics(sums)
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
