"""The generate.py command: read prompts, load the checkpoint, stream or print continuations,
or keep a conversation going in interactive mode. Imports no Lightning and no Hydra.

A checkpoint trained on prompt -> completion pairs remembers its prompt template (data_format):
each prompt is written with it, as in training, unless `template` says otherwise; the model then
ends its completion with the end-of-text token, where generation stops."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from gpt.config import FROM_CHECKPOINT, GenerateConfig
from gpt.errors import UserError
from gpt.generate.text import encode_prompts, generate_text
from gpt.model.transformer import GPT
from gpt.runs.checkpoint import describe_checkpoint, find_checkpoint, load_run, resolve_device
from gpt.templates import Template, format_prompt, get_template, template_of, unescape
from gpt.tokenizer import Tokenizer

SEPARATOR = "---------------\n"


def write_stdout(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def read_prompt_file(path: Path) -> list[str]:
    """One prompt per non-blank line, or for .jsonl one {"prompt": "..."} object per line."""
    if not path.is_file():
        raise UserError(f"prompt_file {path} does not exist; pass a text or .jsonl file")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise UserError(f"prompt_file {path} is not UTF-8 text; save it as UTF-8") from None
    numbered = [(n, line) for n, line in enumerate(lines, 1) if line.strip()]
    if path.suffix != ".jsonl":
        prompts = [line for _, line in numbered]
    else:
        prompts = []
        for n, line in numbered:
            try:
                prompt = json.loads(line).get("prompt") if line.lstrip().startswith("{") else None
            except json.JSONDecodeError:
                prompt = None
            if not isinstance(prompt, str):
                raise UserError(
                    f'{path}:{n}: expected a JSON object with a "prompt" string, like {{"prompt": "Hi"}}'
                )
            prompts.append(prompt)
    if not prompts:
        raise UserError(f"prompt_file {path} holds no prompts")
    return prompts


def read_prompts(cfg: GenerateConfig) -> list[str]:
    if cfg.prompt_file:
        return read_prompt_file(Path(cfg.prompt_file))
    if cfg.prompt == "-":
        return [sys.stdin.read().removesuffix("\n")]
    return [unescape(cfg.prompt)]


def prompt_template(spec: str, data_format: dict[str, Any] | None) -> Template | None:
    """The template prompts are written with (None: as typed), said in one line on stderr.

    spec: GenerateConfig.template (checkpoint: the checkpoint's data_format, if it has one)."""
    mine = spec == FROM_CHECKPOINT
    if mine and data_format is None:
        return None
    template = template_of(data_format) if mine else get_template(spec)
    if template.prompt == "{prompt}":  # "none": the prompt as it is
        return None
    which = f"the checkpoint's ({data_format.get('template')!r})" if mine else f"{spec!r}"
    print(f"template: {which} writes each prompt; template=none leaves them as typed", file=sys.stderr)
    return template


def warn_if_cropped(tokenizer: Tokenizer, prompts: list[str], block: int) -> None:
    for i, row in enumerate(encode_prompts(tokenizer, prompts)):
        if len(row) > block:
            which = f"prompt {i + 1}" if len(prompts) > 1 else "prompt"
            print(
                f"note: {which} has {len(row)} tokens; keeping its last {block} (block_size)", file=sys.stderr
            )


def continue_text(
    model: GPT,
    tokenizer: Tokenizer,
    cfg: GenerateConfig,
    prompt: str | list[str],
    generator: torch.Generator,
    on_text: Callable[[int, str], object] | None,
) -> str | list[str]:
    """generate_text with the command's settings (a GenerateConfig is a SamplingConfig)."""
    return generate_text(
        model,
        tokenizer,
        prompt,
        cfg.max_new_tokens,
        sampling=cfg,
        stop=[unescape(s) for s in cfg.stop],
        num_beams=cfg.num_beams,
        length_penalty=cfg.length_penalty,
        generator=generator,
        use_cache=cfg.use_cache,
        compile=cfg.compile,
        on_text=on_text,
    )


def sample(cfg: GenerateConfig, write: Callable[[str], object] = write_stdout) -> list[str]:
    """Print num_samples continuations of each prompt (prompt included), separated by a line of
    dashes, and return the generated texts. A batch of one row is streamed as it is decoded."""
    device = resolve_device(cfg.device)
    prompts = [] if cfg.interactive else read_prompts(cfg)  # a bad prompt file fails before loading
    if cfg.template != FROM_CHECKPOINT:
        get_template(cfg.template)  # a bad template too
    path = find_checkpoint(cfg.ckpt, cfg.runs_dir)
    print(f"checkpoint: {describe_checkpoint(path)}", file=sys.stderr)  # stdout: generated text only
    run = load_run(path, device=device, dtype=getattr(torch, cfg.dtype))
    model, tokenizer = run.model, run.tokenizer
    template = prompt_template(cfg.template, run.data_format)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    if cfg.interactive:
        return interactive(model, tokenizer, cfg, generator, write, template=template)
    if template is not None:
        prompts = [format_prompt(template, p) for p in prompts]
    warn_if_cropped(tokenizer, prompts, model.config.block_size)
    rows = [p for p in prompts for _ in range(cfg.num_samples)]
    texts: list[str] = []
    for start in range(0, len(rows), cfg.batch_size):
        batch = rows[start : start + cfg.batch_size]
        streamed = len(batch) == 1
        if streamed:
            write((SEPARATOR if start else "") + batch[0])
        on_text = (lambda _, piece: write(piece)) if streamed else None
        outs = continue_text(model, tokenizer, cfg, batch, generator, on_text)
        if streamed:
            write("\n")
        else:
            for i, (prompt, out) in enumerate(zip(batch, outs, strict=True)):
                write((SEPARATOR if start + i else "") + prompt + out + "\n")
        texts += outs
    return texts


def interactive(
    model: GPT,
    tokenizer: Tokenizer,
    cfg: GenerateConfig,
    generator: torch.Generator,
    write: Callable[[str], object] = write_stdout,
    read_line: Callable[[], str] = sys.stdin.readline,
    tty: bool | None = None,
    template: Template | None = None,
) -> list[str]:
    """A small REPL: each line you type is added to the conversation and the model continues it.

    The conversation starts as `prompt`; each line is added as typed, or written with `template`
    (a fine-tuned model's prompt format); the model sees its last block_size tokens. An empty line
    lets the model go on; /reset starts over; /quit or end of input (Ctrl-D) leaves. Every reply
    ends with a newline. On a terminal (tty: stdin is one) each line is asked for with `> ` on
    stderr; from piped input, which nobody sees typed, replies are separated by a line of dashes
    instead, as num_samples separates samples.
    """
    tty = sys.stdin.isatty() if tty is None else tty
    history, texts = unescape(cfg.prompt), []
    while True:
        if tty:
            print("> ", end="", file=sys.stderr, flush=True)
        line = read_line()
        command = line.strip()
        if not line or command == "/quit":
            if tty and not line:
                print(file=sys.stderr)  # after Ctrl-D: the shell's prompt on a line of its own
            return texts
        if command == "/reset":
            history = unescape(cfg.prompt)
            continue
        if template is not None:
            turn = history + format_prompt(template, line.removesuffix("\n"))
        else:
            turn = history + (line if line.endswith("\n") else line + "\n")
        try:
            encode_prompts(tokenizer, [turn])  # refused before anything of this turn is written
        except UserError as e:  # e.g. a character outside the vocabulary: say so, keep the session
            print(f"error: {e}", file=sys.stderr)
            continue
        if texts and not tty:
            write(SEPARATOR)
        out = continue_text(model, tokenizer, cfg, turn, generator, lambda _, piece: write(piece))
        history = turn
        if not out.endswith("\n"):
            out += "\n"
            write("\n")
        history += out
        texts.append(out)
