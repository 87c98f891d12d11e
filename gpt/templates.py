"""Prompt templates: how a prompt (and a chat turn) is written before the model sees it, named
(none, plain, alpaca, chatml) or given as a format string, and rebuilt from a checkpoint's record
(`data_format`). The base layer, so that generation formats prompts without the data-prep code."""

from __future__ import annotations

import re
import string
from dataclasses import dataclass
from typing import Any

from gpt.errors import ConfigError


@dataclass(frozen=True)
class Template:
    """How the parts of a row become text.

    prompt: a single-turn prompt, a format string over {prompt} (and, for Alpaca rows, {instruction}
    and {input}); prompt_with_input: the same for Alpaca rows with a non-empty input (None: `prompt`);
    turn: a chat turn that is not the assistant's, over {role} and {content}; reply: the text before
    each assistant turn (not trained on).
    """

    prompt: str
    prompt_with_input: str | None = None
    turn: str = "{content}\n"
    reply: str = ""

    def render_prompt(self, fields: dict[str, str]) -> str:
        fmt = self.prompt_with_input if fields.get("input") and self.prompt_with_input else self.prompt
        return fmt.format_map(fields)


ALPACA_HEAD = (
    "Below is an instruction that describes a task{paired}. "
    "Write a response that appropriately completes the request.\n\n### Instruction:\n{{instruction}}\n\n"
)
TEMPLATES = {
    # The prompt as it is, the completion right after it.
    "none": Template(prompt="{prompt}", turn="{content}"),
    # The prompt, a line break, the completion.
    "plain": Template(prompt="{prompt}\n"),
    # Stanford Alpaca's prompt (also litgpt's "alpaca" style).
    "alpaca": Template(
        prompt=ALPACA_HEAD.format(paired="") + "### Response:\n",
        prompt_with_input=ALPACA_HEAD.format(paired=", paired with an input that provides further context")
        + "### Input:\n{input}\n\n### Response:\n",
        turn="### Instruction:\n{content}\n\n",
        reply="### Response:\n",
    ),
    # ChatML; the end-of-text token closes each assistant turn.
    "chatml": Template(
        prompt="<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n",
        turn="<|im_start|>{role}\n{content}<|im_end|>\n",
        reply="<|im_start|>assistant\n",
    ),
}
PROMPT_KEYS = {"prompt", "instruction", "input"}


def unescape(text: str) -> str:
    r"""`\n`, `\t` and `\\` typed on the command line (a shell and Hydra keep them as two characters)
    -> a line break, a tab and one backslash (so `\\n` is a backslash and an n)."""
    return re.sub(r"\\([nt\\])", lambda m: {"n": "\n", "t": "\t", "\\": "\\"}[m[1]], text)


def get_template(spec: str) -> Template:
    """A named template (none, plain, alpaca, chatml) or a format string over {prompt} such as
    'Q: {prompt}\\nA: ' ({instruction} and {input} too, for Alpaca rows)."""
    if spec in TEMPLATES:
        return TEMPLATES[spec]
    fmt = unescape(spec)
    try:
        keys = {name for _, name, _, _ in string.Formatter().parse(fmt) if name is not None}
    except ValueError as e:
        raise ConfigError(f"template {spec!r} is not a format string ({e}); write {{ as {{{{") from None
    if not keys & {"prompt", "instruction"} or keys - PROMPT_KEYS:
        raise ConfigError(
            f"template {spec!r} is neither one of {', '.join(TEMPLATES)} nor a format string over "
            "{prompt} (with {instruction} and {input} for Alpaca rows), such as 'Q: {prompt}\\nA: '"
        )
    return Template(
        prompt=fmt, turn=fmt.replace("{prompt}", "{content}").replace("{instruction}", "{content}")
    )


def template_of(fmt: dict[str, Any]) -> Template:
    """The template a checkpoint's `data_format` records (its strings, not only its name)."""
    return Template(**{k: fmt[k] for k in ("prompt", "prompt_with_input", "turn", "reply")})


def format_prompt(fmt: dict[str, Any] | Template, prompt: str) -> str:
    """A user's prompt as the model saw prompts in training (`fmt`: a checkpoint's data_format)."""
    template = fmt if isinstance(fmt, Template) else template_of(fmt)
    return template.render_prompt({"prompt": prompt, "instruction": prompt, "input": ""})
