"""serve.py's logic: load the checkpoint, start the engine, and run the app under uvicorn."""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
from pathlib import Path

import torch
import uvicorn

from gpt.config import FROM_CHECKPOINT, ServeConfig
from gpt.errors import UserError
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


def listening_socket(host: str, port: int) -> socket.socket:
    """A socket bound to host:port, for uvicorn: a port in use is one line before the model loads."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as e:
        raise UserError(
            f"cannot listen on {host}:{port}: {e.strerror or e}; choose another port= (or host=)"
        ) from None
    return sock


def serve(cfg: ServeConfig) -> None:
    device = resolve_device(cfg.device)
    if cfg.template != FROM_CHECKPOINT:
        get_template(cfg.template)  # a bad template fails before the model is loaded
    sock = listening_socket(cfg.host, cfg.port)
    path = find_checkpoint(cfg.ckpt, cfg.runs_dir)
    print(f"checkpoint: {describe_checkpoint(path)}", file=sys.stderr)
    run = load_run(path, device=device, dtype=getattr(torch, cfg.dtype))
    if run.model.config.arch == "encoder_decoder":  # the engine batches decoder-only steps
        raise UserError(
            f"{path} is an encoder_decoder model, which serve.py does not serve (it batches decoder-only "
            "models); sample from it with generate.py, score it with evaluate.py"
        )
    api_key = cfg.api_key or os.environ.get(API_KEY_VARIABLE) or None
    name = cfg.model_name or run_name(path)
    engine = Engine(run.model, run.tokenizer, cfg.max_batch, cfg.max_queue, start=False)  # run() below
    app = create_app(engine, name, chat_template(cfg.template, run.data_format), api_key, cfg.max_body_bytes)
    where = f"http://{cfg.host}:{cfg.port}"
    key = "a Bearer key required" if api_key else "no key required"
    print(f"serving {name!r} at {where}/v1 (OpenAI API, {key}) and a chat page at {where}/", file=sys.stderr)
    # The model runs on this (the main) thread and uvicorn in another: torch's parallel regions run at
    # half speed in a thread other than the one that ran them first (docs/benchmarks.md, "Serving").
    server = uvicorn.Server(uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level="warning"))
    http = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="uvicorn", daemon=True)
    signals: list[int] = []

    def stop(signum: int, frame: object) -> None:
        signals.append(signum)
        raise KeyboardInterrupt

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stop)
    http.start()
    try:
        engine.run(until=lambda: not http.is_alive())
    except KeyboardInterrupt:
        pass
    finally:
        server.should_exit = True
        http.join()
        engine.close()
    if signals:  # Ctrl-C (130) or SIGTERM (143), as a shell reports a process stopped by them
        raise SystemExit(128 + signals[0])
    if not server.started:
        raise SystemExit(1)  # uvicorn failed to start: its lines are on stderr
