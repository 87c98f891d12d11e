"""serve.py's logic: load the checkpoint, start the engine, and run the app under uvicorn."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import uvicorn

from gpt.config import FROM_CHECKPOINT, ServeConfig
from gpt.runs.checkpoint import describe_checkpoint, find_checkpoint, load_run, resolve_device
from gpt.serve.app import create_app
from gpt.serve.engine import Engine
from gpt.templates import Template, get_template, template_of

API_KEY_VARIABLE = "GPT_API_KEY"


def run_name(path: Path) -> str:
    """A checkpoint's name for clients: its run dir (runs/2026-12-07/11-15-52), or the path itself."""
    named = path.parent.parent if path.parent.name == "checkpoints" else path
    relative = os.path.relpath(named)
    return named.as_posix() if relative.startswith("..") else Path(relative).as_posix()


def chat_template(spec: str, data_format: dict | None) -> Template | None:
    if spec == FROM_CHECKPOINT:
        return None if data_format is None else template_of(data_format)
    return get_template(spec)


def serve(cfg: ServeConfig) -> None:
    device = resolve_device(cfg.device)
    if cfg.template != FROM_CHECKPOINT:
        get_template(cfg.template)  # a bad template fails before the model is loaded
    path = find_checkpoint(cfg.ckpt, cfg.runs_dir)
    print(f"checkpoint: {describe_checkpoint(path)}", file=sys.stderr)
    run = load_run(path, device=device, dtype=getattr(torch, cfg.dtype))
    api_key = cfg.api_key or os.environ.get(API_KEY_VARIABLE) or None
    name = cfg.model_name or run_name(path)
    engine = Engine(run.model, run.tokenizer, max_batch=cfg.max_batch, max_queue=cfg.max_queue)
    app = create_app(engine, name, chat_template(cfg.template, run.data_format), api_key, cfg.max_body_bytes)
    where = f"http://{cfg.host}:{cfg.port}"
    key = "a Bearer key required" if api_key else "no key required"
    print(f"serving {name!r} at {where}/v1 (OpenAI API, {key}) and a chat page at {where}/", file=sys.stderr)
    try:
        uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning")
    finally:
        engine.close()
