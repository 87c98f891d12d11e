"""What export.py does: a run's checkpoint found, loaded and written as a Hugging Face directory."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from gpt.config import ExportConfig
from gpt.errors import UserError
from gpt.interop.export import export
from gpt.interop.hf import check_format, hf_format
from gpt.runs.checkpoint import describe_checkpoint, find_checkpoint, load_model


def export_checkpoint(cfg: ExportConfig) -> None:
    """Check the arguments, load the checkpoint, write the export and say what was written."""
    out = Path(cfg.out)
    existing = next(p for p in (out, *out.parents) if p.exists())  # what mkdir would build on
    if not existing.is_dir():
        raise UserError(f"out={out}: {existing} is a file; pass a folder to write the export into")
    check_format(cfg.format)
    path = find_checkpoint(cfg.ckpt, cfg.runs_dir)
    print(f"checkpoint: {describe_checkpoint(path)}", file=sys.stderr)
    model, tokenizer = load_model(path)
    hf_format(model.config, cfg.format)  # refuse before anything is written
    fmt, notes = export(model, tokenizer, out, cfg.format, getattr(torch, cfg.dtype))  # EXPORT_DTYPES
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    n = model.num_params(exclude_positions=False) / 1e6
    print(f"wrote {fmt} format ({n:.2f}M parameters, {cfg.dtype}) to {out}")
