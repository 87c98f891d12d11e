"""Prompt templates (gpt.templates): named, format strings as typed on a command line, and one unescape
for templates, prompts and stop strings."""

from __future__ import annotations

from dataclasses import asdict

import pytest

from gpt.errors import ConfigError
from gpt.templates import TEMPLATES, format_prompt, get_template, template_of, unescape


def test_unescape_turns_typed_escapes_into_characters():
    assert unescape(r"a\nb\tc") == "a\nb\tc"
    # \\ is one backslash, so \\n stays a backslash and an n, not a line break
    assert unescape(r"C:\\new") == "C:\\new"
    assert unescape(r"\x and \q") == r"\x and \q"


def test_a_format_string_is_unescaped_as_a_prompt_is():
    assert get_template(r"Q: {prompt}\nA: ").prompt == "Q: {prompt}\nA: "
    assert get_template(r"dir\\name {prompt}").prompt == "dir\\name {prompt}"


def test_a_named_template_and_its_record_write_the_same_prompt():
    for name, template in TEMPLATES.items():
        assert get_template(name) is template
        assert format_prompt(asdict(template), "hi") == format_prompt(template, "hi")
        assert template_of({"template": name, **asdict(template)}) == template
    assert format_prompt(get_template("plain"), "hi") == "hi\n"


@pytest.mark.parametrize("spec", ["Q: {question}", "{prompt", "no field at all"])
def test_a_bad_template_is_refused(spec):
    with pytest.raises(ConfigError):
        get_template(spec)


def test_the_checkpoints_template_is_spelled_checkpoint_and_null_means_the_same():
    from gpt.config import FROM_CHECKPOINT
    from tests.helpers import generate_config

    assert FROM_CHECKPOINT == "checkpoint"
    assert generate_config().template == "checkpoint"
    assert generate_config(template=None).template == "checkpoint"  # the spelling before 0.5
    assert generate_config(template="none").template == "none"
