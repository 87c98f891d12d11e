"""Export a checkpoint as a Hugging Face directory (transformers loads it with from_pretrained).

python export.py ckpt=runs/2026-11-21/14-06-53 out=exported/        # format chosen from the model
python export.py ckpt=path/to/last.ckpt out=exported/ format=llama dtype=bfloat16
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
import torch
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from gpt.config import ExportConfig
from gpt.errors import UserError, exit_on_user_error
from gpt.interop.export import export
from gpt.interop.hf import check_format, hf_format
from gpt.runs.checkpoint import describe_checkpoint, find_checkpoint, load_model

ConfigStore.instance().store(name="_schema", node=ExportConfig)


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


@hydra.main(version_base="1.3", config_path="conf", config_name="export")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    export_checkpoint(OmegaConf.to_object(cfg))


if __name__ == "__main__":
    exit_on_user_error(main)()
