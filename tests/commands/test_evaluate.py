"""evaluate.py (and python -m gpt.evaluate) as a user runs it, on a checkpoint of random weights
saved the way train.py saves them: the table, one JSONL line per example, the metrics as JSON, the
checkpoint's prompt template; bad input ends in one line, exit 2, and nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra.core.config_store import ConfigStore

from gpt.config import DataConfig, EvaluateConfig
from gpt.data.pairs import data_format
from gpt.evaluate.__main__ import to_config
from gpt.evaluate.command import evaluate_checkpoint
from gpt.runs.checkpoint import save_weights_checkpoint
from gpt.tokenizer import CharTokenizer
from tests.helpers import (
    CHARS,
    assert_ok,
    assert_one_line_exit,
    command,
    run_forked,
    tiny_model,
    write_rows,
)

ROWS = [
    {"prompt": "Who is there?", "completion": "Nay, answer me."},
    {"source": "Long live the king", "target": "Long live the king!"},
    {"instruction": "Say yes", "input": "", "output": "yes"},
]
METRIC_ROWS = ["exact_match", "token_accuracy", "chrf", "bleu"]

ConfigStore.instance().store(group="data", name="_schema", node=DataConfig)  # as evaluate.py does
evaluate = command("evaluate", EvaluateConfig, evaluate_checkpoint, to_object=to_config)


@pytest.fixture
def work(tmp_path: Path) -> Path:
    """A run dir with a checkpoint (random weights, a character vocabulary with end-of-text) and a
    pairs file."""
    tok = CharTokenizer(CHARS, eot=True)
    save_weights_checkpoint(
        tiny_model(vocab_size=tok.vocab_size), tok, tmp_path / "run/checkpoints/last.ckpt"
    )
    write_rows(tmp_path / "test.jsonl", ROWS)
    return tmp_path


def files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def test_the_command_prints_a_table_and_writes_the_outputs_beside_the_run(work):
    done = run_forked(
        "evaluate.py", "ckpt=run", "data.path=test.jsonl", "methods=[greedy,beam]", "num_beams=2", cwd=work
    )
    assert_ok(done)
    lines = done.stdout.strip().splitlines()
    assert lines[0].split() == ["metric", "greedy", "beam"]
    assert [line.split()[0] for line in lines[1:]] == METRIC_ROWS
    assert all(0 <= float(v) <= 100 for line in lines[1:] for v in line.split()[1:])
    assert "checkpoint: run/checkpoints/last.ckpt (weights only, no training step)" in done.stderr
    outputs = [json.loads(line) for line in (work / "run/evals/generate-test.jsonl").read_text().splitlines()]
    assert len(outputs) == len(ROWS)
    assert outputs[0]["where"] == "test.jsonl:1" and outputs[0]["prompt"] == "Who is there?\n"  # plain
    assert outputs[2]["reference"] == "yes"
    assert all(
        isinstance(o[m], str) and isinstance(o[f"{m}_match"], bool)
        for o in outputs
        for m in ("greedy", "beam")
    )
    summary = json.loads((work / "run/evals/generate-test.json").read_text())
    assert summary["examples"] == 3 and summary["template"] == "plain (the checkpoint saved none)"
    assert summary["task"] == "generate" and summary["step"] is None
    assert list(summary["metrics"]) == [f"{m}/{k}" for m in ("greedy", "beam") for k in METRIC_ROWS]
    assert summary["settings"]["num_beams"] == 2
    # max_new_tokens fitted to the longest reference: 19 characters and a margin of 8.
    assert summary["settings"]["max_new_tokens"] == 27


def test_python_m_gpt_evaluate_is_the_same_command(work):
    done = run_forked(
        "-m", "gpt.evaluate", "ckpt=run", "data.path=test.jsonl", "limit=2", "out=here", cwd=work
    )
    assert_ok(done)
    assert done.stdout.strip().splitlines()[0].split() == ["metric", "greedy"]
    assert len((work / "here/generate-test.jsonl").read_text().splitlines()) == 2
    assert (work / "here/generate-test.json").is_file() and not (work / "run/evals").exists()


def test_the_prompts_are_formatted_as_the_checkpoint_was_trained_unless_data_template_is_given(work, capsys):
    path = work / "run/checkpoints/last.ckpt"
    ckpt = torch.load(path, weights_only=True)
    fmt = data_format(DataConfig(source="pairs", path="x", template="Q: {prompt}\\nA: "))
    ckpt["hyper_parameters"]["data_format"] = fmt
    torch.save(ckpt, path)

    def prompts(*overrides: str) -> tuple[list[str], str]:
        evaluate(
            ["ckpt=" + str(work / "run"), f"data.path={work / 'test.jsonl'}", "max_new_tokens=2", *overrides]
        )
        rows = (work / "run/evals/generate-test.jsonl").read_text().splitlines()
        summary = json.loads((work / "run/evals/generate-test.json").read_text())
        return [json.loads(r)["prompt"] for r in rows], summary["template"]

    assert prompts() == (
        ["Q: Who is there?\nA: ", "Q: Long live the king\nA: ", "Q: Say yes\nA: "],
        "Q: {prompt}\\nA:  (the checkpoint's)",
    )
    assert prompts("data.template=plain")[0][0] == "Who is there?\n"
    assert "evaluating 3 examples" in capsys.readouterr().err


BAD_ROWS = {
    "bad-row.jsonl": [ROWS[0], {"question": "?", "answer": "!"}],
    "not-json.jsonl": [ROWS[0], "{oops"],
    "digit.jsonl": [ROWS[0], {"prompt": "Count", "completion": "1, 2"}],
}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.path=missing.jsonl"], "data.path 'missing.jsonl' does not exist; pass a .jsonl file"),
        (["data.path=bad-row.jsonl"], "bad-row.jsonl:2 has none of the paired formats' fields"),
        (["data.path=not-json.jsonl"], "not-json.jsonl:2 is not JSON"),
        (
            ["data.path=digit.jsonl"],
            "digit.jsonl:2: the completion: character '1' (U+0031) is not in this model's",
        ),
        (["ckpt=nowhere"], "checkpoint nowhere does not exist"),
        (["ckpt=null", "runs_dir=empty"], "no checkpoint under empty/"),
        (["ckpt=test.jsonl"], "test.jsonl is not a checkpoint"),
        (["num_beams=0", "methods=[beam]"], "num_beams=0 must be >= 1"),
        (["methods=[greedy,top_k]"], "'top_k' is not a decoding method; choose among greedy, beam, sampled"),
        (["limit=0"], "limit=0 must be >= 1"),
        (["out=test.jsonl"], "out=test.jsonl: test.jsonl is a file"),
        (["data=text"], "data=text: task=generate reads a .jsonl file"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_nothing_written(work, capsys, monkeypatch, overrides, message):
    monkeypatch.chdir(work)
    (work / "empty").mkdir()
    for name, rows in BAD_ROWS.items():
        write_rows(work / name, rows)
    before = files(work)
    args = ["ckpt=run", "data.path=test.jsonl", "max_new_tokens=2"]
    assert_one_line_exit(evaluate, [*args, *overrides], message, capsys)
    assert files(work) == before


def test_bad_input_in_a_subprocess_too(work):
    done = run_forked("evaluate.py", "ckpt=run", "data.path=test.jsonl", "methods=[greedy,nucleus]", cwd=work)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip().splitlines() == [
        "error: methods: 'nucleus' is not a decoding method; choose among greedy, beam, sampled, e.g. "
        "methods=[greedy,beam]"
    ]
    assert not (work / "run/evals").exists()
