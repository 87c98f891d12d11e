"""The evaluate.py command: read the pairs with the checkpoint's prompt template, generate with each
decoding method, print a table (metric x method) and write each example's outputs (JSONL) and the
metrics (JSON), by default to <run dir>/evals/. Bad input is refused before anything is written."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from dataclasses import asdict, fields, replace
from itertools import islice
from pathlib import Path
from typing import Any

import torch

from gpt.config import FROM_CHECKPOINT, DataConfig, DecodeConfig, EvaluateConfig
from gpt.data.pairs import Template, get_template, read_examples, template_of
from gpt.data.sources import find_files
from gpt.errors import UserError
from gpt.evaluate.decode import default_max_new_tokens, evaluate
from gpt.evaluate.examples import encode_examples
from gpt.evaluate.metrics import METRICS
from gpt.generate.command import resolve_device
from gpt.runs.checkpoint import (
    checkpoint_data_format,
    describe_checkpoint,
    find_checkpoint,
    load_model,
    read_checkpoint,
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
    name = path.name
    for suffix in (".gz", ".jsonl"):
        name = name.removesuffix(suffix)
    return name or "eval"


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


def evaluate_checkpoint(cfg: EvaluateConfig) -> dict[str, dict[str, float]]:
    """What evaluate.py does; returns the metrics, {method: {metric: percentage}}."""
    device = resolve_device(cfg.device)
    files = pair_files(cfg.data)
    path = find_checkpoint(cfg.ckpt, cfg.runs_dir)
    out = Path(cfg.out) if cfg.out else run_dir_of(path) / "evals"
    check_out(out)
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
    print(format_table(metrics))
    name = f"{stem(Path(cfg.data.path))}-{path.stem if path.is_file() else path.name}"
    outputs, summary = out / f"{name}.jsonl", out / f"{name}.metrics.json"
    step = None if path.is_dir() else read_checkpoint(path, mmap=True).get("global_step")
    write_jsonl(outputs, records)
    write_json(
        summary,
        {
            "checkpoint": str(path),
            "step": step,
            "data": str(cfg.data.path),
            "examples": len(examples),
            "template": template_name,
            "settings": asdict(settings),
            "metrics": metrics,
        },
    )
    print(f"wrote {outputs} ({len(records)} examples) and {summary}", file=sys.stderr)
    return metrics
