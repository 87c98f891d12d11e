"""The generate.py command: in-process through gpt.generate.command.sample, and as a subprocess for
stdin, interactive mode and one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gpt.config import DataConfig
from gpt.data.pairs import data_format, get_template
from gpt.errors import ConfigError, UserError
from gpt.generate.command import SEPARATOR, interactive, sample
from gpt.generate.text import generate_text
from gpt.runs.checkpoint import load_model, load_run, resolve_device, save_weights_checkpoint
from gpt.tokenizer import CharTokenizer
from tests.helpers import CHARS, ROOT, generate_config, tiny_model

# Its tests share costly module fixtures: one xdist worker runs them all, the fixtures once.
pytestmark = pytest.mark.xdist_group(__name__)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A checkpoint of a random (lively) tiny model with a character vocabulary: no training needed."""
    tok = CharTokenizer(CHARS)
    model = tiny_model(vocab_size=tok.vocab_size, init_std=0.5)
    return save_weights_checkpoint(model, tok, tmp_path_factory.mktemp("ckpt") / "last.ckpt")


def run(ckpt: Path, **kw) -> tuple[str, list[str]]:
    out: list[str] = []
    texts = sample(generate_config(ckpt=str(ckpt), device="cpu", **kw), write=out.append)
    return "".join(out), texts


def alone(ckpt: Path, prompt: str, n: int, **kw) -> str:
    model, tok = load_model(ckpt)
    return generate_text(model, tok, prompt, n, **kw)


def generate_py(*args: str, stdin: str = "", cwd: Path) -> subprocess.CompletedProcess:
    env = os.environ | {"PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, str(ROOT / "generate.py"), *args],
        input=stdin,
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_saved_weights_checkpoint_loads_back(ckpt):
    model, tok = load_model(ckpt)
    assert tok.vocab_size == len(CHARS) and model.config.n_embd == 32


def test_prompt_file_batched_with_samples_equals_one_at_a_time(ckpt, tmp_path):
    prompts = ["ROMEO:", "To be, or not to be, that is", "A"]
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(prompts[:2]) + "\n\n" + prompts[2] + "\n")  # blank lines are skipped
    out, texts = run(ckpt, prompt_file=str(path), num_samples=2, max_new_tokens=25, temperature=0)
    expected = [alone(ckpt, p, 25, temperature=0) for p in prompts]
    assert texts == [t for t in expected for _ in range(2)]
    blocks = out.split("---------------\n")
    assert blocks == [p + t + "\n" for p, t in zip(prompts, expected, strict=True) for _ in range(2)]


def test_batch_size_does_not_change_greedy_results(ckpt, tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "ROMEO:"}\n{"prompt": "Line one\\nline two", "id": 7}\n')
    kw = dict(prompt_file=str(path), max_new_tokens=20, temperature=0)
    one_by_one = run(ckpt, batch_size=1, **kw)  # streamed
    together = run(ckpt, batch_size=8, **kw)
    assert one_by_one == together
    assert together[0].startswith("ROMEO:") and "Line one\nline two" in together[0]


def test_bad_prompt_files_are_one_line_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"text": "no prompt"}\n')
    with pytest.raises(UserError, match=r'bad.jsonl:2: expected a JSON object with a "prompt" string'):
        sample(generate_config(ckpt=str(tmp_path), prompt_file=str(bad)))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(UserError, match="holds no prompts"):
        sample(generate_config(ckpt=str(tmp_path), prompt_file=str(empty)))


def test_stop_strings_from_the_command_line_understand_newlines(ckpt):
    full = alone(ckpt, "ROMEO:", 60, temperature=0)
    stop = full[10:13]
    escaped = stop.replace("\\", "\\\\").replace("\n", "\\n")
    _, texts = run(ckpt, prompt="ROMEO:", max_new_tokens=60, temperature=0, stop=[escaped, "@@"])
    assert texts == [full[: full.index(stop)]]


def test_long_prompt_is_cropped_with_a_notice(ckpt, capsys):
    prompt = "To be, or not to be, that is the question"  # 41 characters, block 32
    _, texts = run(ckpt, prompt=prompt, max_new_tokens=5, temperature=0)
    assert capsys.readouterr().err.splitlines() == [
        f"checkpoint: {ckpt} (weights only, no training step)",
        "note: prompt has 41 tokens; keeping its last 32 (block_size)",
    ]
    assert texts == [alone(ckpt, prompt[-32:], 5, temperature=0)]


@pytest.mark.parametrize(
    "override, message",
    [
        (dict(min_p=1.5), "min_p=1.5 must be in [0, 1] (or null)"),
        (dict(repetition_penalty=0.0), "repetition_penalty=0.0 must be > 0"),
        (dict(num_beams=0), "num_beams=0 must be >= 1"),
        (dict(stop=["a", ""]), "stop strings must not be empty"),
        (dict(num_beams=2, num_samples=2), "beam search is deterministic"),
        (dict(interactive=True, prompt="-"), "interactive=true reads what you type from stdin"),
    ],
)
def test_bad_values_are_refused(override, message):
    with pytest.raises(
        ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
    ):
        generate_config(**override)


def test_prompt_from_stdin_and_one_line_error(ckpt, tmp_path):
    proc = generate_py(
        f"ckpt={ckpt}", "prompt=-", "max_new_tokens=15", "temperature=0", stdin="ROMEO:\n", cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "ROMEO:" + alone(ckpt, "ROMEO:", 15, temperature=0) + "\n"
    proc = generate_py(f"ckpt={ckpt}", "min_p=1.5", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: min_p=1.5 must be in [0, 1] (or null)"]


def test_interactive_session_continues_the_conversation(ckpt, tmp_path):
    proc = generate_py(
        f"ckpt={ckpt}",
        "interactive=true",
        "max_new_tokens=12",
        "temperature=0",
        "prompt=",
        stdin="ROMEO: hi\n/reset\nJULIET: who?\nnot in the vocabulary: §\nand then\n",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    first = alone(ckpt, "ROMEO: hi\n", 12, temperature=0)
    history = "JULIET: who?\n"
    second = alone(ckpt, history, 12, temperature=0)
    history += second + ("" if second.endswith("\n") else "\n") + "and then\n"
    third = alone(ckpt, history, 12, temperature=0)
    lines = lambda t: t if t.endswith("\n") else t + "\n"
    # Piped input is not seen typed: a line of dashes shows where each reply starts, no "> ".
    assert proc.stdout == lines(first) + SEPARATOR + lines(second) + SEPARATOR + lines(third)
    assert "> " not in proc.stderr
    assert "error: character '§' (U+00A7) is not in this model's" in proc.stderr


def test_interactive_on_a_terminal_prompts_and_ends_its_line(ckpt, capsys):
    model, tok = load_model(ckpt)
    cfg = generate_config(ckpt=str(ckpt), interactive=True, max_new_tokens=8, temperature=0, prompt="")
    typed = iter(["ROMEO: hi\n", "and?\n", ""])  # "" is Ctrl-D
    out: list[str] = []
    texts = interactive(model, tok, cfg, torch.Generator(), out.append, lambda: next(typed), tty=True)
    assert len(texts) == 2 and all(t.endswith("\n") for t in texts)
    assert "".join(out) == "".join(texts)  # no separators: the typed lines show where replies start
    assert capsys.readouterr().err == "> " * 3 + "\n"  # the shell's prompt after Ctrl-D on its own line


@pytest.mark.slow
def test_benchmark_writes_its_json(tmp_path):
    out = tmp_path / "generate.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bench_generate.py"), "new_tokens=8", "repeats=1"]
        + [f"out={out}", f"ckpt_dir={tmp_path}"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert [(r["mode"], r["batch"]) for r in result["decoding"]] == [
        ("cached", 1),
        ("uncached", 1),
        ("cached", 8),
        ("cached", 16),
    ]
    bound = result["bandwidth_bound"]
    assert bound["read_gb_per_s"] > 0 and bound["weights_mb"] == pytest.approx(4 * 45.53, abs=0.1)
    # the share is of the unrounded speeds: within rounding of the rounded ones
    assert bound["batch1_share"] == pytest.approx(
        result["decoding"][0]["tokens_per_s"] / bound["tokens_per_s"], abs=2e-3
    )
    assert result["cached_equals_uncached_tokens"] is True
    assert result["setup"]["prompt_tokens"] == 7 and result["first_token_seconds_nano"]["median"] > 0
    assert "cached / uncached" in proc.stdout


# ----------------------------------------------------------------------------- prompt templates

QA = "Q: {prompt}\\nA: "  # as typed on a command line: a backslash and an n


@pytest.fixture(scope="module")
def pairs_ckpt(tmp_path_factory) -> Path:
    """A (random) model as fine-tuning on pairs saves it: an end-of-text token and a data_format."""
    tok = CharTokenizer(CHARS, eot=True)
    model = tiny_model(vocab_size=tok.vocab_size, init_std=0.5)
    fmt = data_format(DataConfig(source="pairs", path="train.jsonl", template=QA))
    return save_weights_checkpoint(
        model, tok, tmp_path_factory.mktemp("pairs") / "last.ckpt", data_format=fmt
    )


def test_the_checkpoints_template_writes_the_prompt_and_none_turns_it_off(pairs_ckpt, tmp_path):
    assert load_run(pairs_ckpt).data_format["prompt"] == "Q: {prompt}\nA: "
    args = (f"ckpt={pairs_ckpt}", "prompt=hello", "max_new_tokens=12", "temperature=0")
    proc = generate_py(*args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    formatted = "Q: hello\nA: "
    assert proc.stdout == formatted + alone(pairs_ckpt, formatted, 12, temperature=0) + "\n"
    assert "template: the checkpoint's" in proc.stderr
    proc = generate_py(*args, "template=none", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "hello" + alone(pairs_ckpt, "hello", 12, temperature=0) + "\n"
    assert "template" not in proc.stderr


def test_a_template_given_replaces_the_checkpoints_and_a_bad_one_is_refused(pairs_ckpt, ckpt, capsys):
    out, texts = run(pairs_ckpt, prompt="hi", template="plain", max_new_tokens=8, temperature=0)
    assert out == "hi\n" + alone(pairs_ckpt, "hi\n", 8, temperature=0) + "\n"
    assert "template: 'plain' writes each prompt" in capsys.readouterr().err
    out, _ = run(ckpt, prompt="hi", template="Say {prompt}:", max_new_tokens=8, temperature=0)
    assert out.startswith("Say hi:")  # a checkpoint trained on text takes one too
    capsys.readouterr()
    run(ckpt, prompt="hi", max_new_tokens=8, temperature=0)
    assert "template" not in capsys.readouterr().err  # and has none of its own
    with pytest.raises(ConfigError, match="template 'Q: {question}' is neither one of"):
        run(pairs_ckpt, template="Q: {question}")


def test_interactive_writes_each_line_with_the_template(pairs_ckpt):
    model, tok = load_model(pairs_ckpt)
    cfg = generate_config(ckpt=str(pairs_ckpt), interactive=True, max_new_tokens=8, temperature=0, prompt="")
    typed = iter(["hi\n", ""])
    out: list[str] = []
    template = get_template(QA)
    interactive(model, tok, cfg, torch.Generator(), out.append, lambda: next(typed), False, template)
    first = alone(pairs_ckpt, "Q: hi\nA: ", 8, temperature=0)
    assert "".join(out) == first + ("" if first.endswith("\n") else "\n")


def test_devices_this_machine_lacks_are_refused_before_loading(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(UserError, match="device='tpu' is not a torch device; use auto, cpu, cuda or cuda:N"):
        resolve_device("tpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="device=cuda:0 but torch finds no CUDA GPU here; use device=cpu"):
        resolve_device("cuda:0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # as on a machine with two GPUs
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(
        UserError, match=r"device=cuda:2 but this machine has 2 CUDA GPU\(s\), cuda:0 to cuda:1"
    ):
        resolve_device("cuda:2")
