"""evaluate.py's likelihood tasks through the commands, on real short runs: task=bpb equals the run's
own last val/bpb and scores any corpus; hellaswag and mc on files; HellaSwag missing or corrupt in
the data root; compare.py shows the results; callbacks.evaluate logs a task to the CSV log and to
wandb (offline), and under 2-process DDP its shared-out, summed result equals evaluate.py's.
Agreement with lm-evaluation-harness: tests/evaluate/test_harness.py."""

from __future__ import annotations

import json
import urllib.error
from pathlib import Path

import pytest
from hydra.core.config_store import ConfigStore

from gpt.config import DataConfig, EvaluateConfig
from gpt.evaluate import choice
from gpt.evaluate.__main__ import to_config
from gpt.evaluate.command import evaluate_checkpoint
from gpt.runs.metrics import read_metrics
from tests.helpers import (
    assert_ok,
    assert_one_line_exit,
    command,
    last_line,
    run_forked,
    write_corpus,
)

# Its tests share costly module fixtures: one xdist worker runs them all, the fixtures once.
pytestmark = pytest.mark.xdist_group(__name__)

FIXTURES = Path(__file__).resolve().parents[1] / "evaluate" / "fixtures"
HELLASWAG = FIXTURES / "hellaswag_mini.jsonl"
MC = FIXTURES / "mc_mini.jsonl"
# experiment=tiny on Tiny Shakespeare's characters (the default data), with validation windows left
# to train.py (null: 512 on a CPU with this vocabulary), so the checkpoint records what it chose.
TRAIN = ["train.py", "experiment=tiny", "data.val_windows=null", "~callbacks.progress_bar"]

ConfigStore.instance().store(group="data", name="_schema", node=DataConfig)  # as evaluate.py does
evaluate = command("evaluate", EvaluateConfig, evaluate_checkpoint, to_object=to_config)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """A finished default-data run in work/run (12 steps of experiment=tiny) and a text corpus."""
    work = tmp_path_factory.mktemp("tasks")
    write_corpus(work / "corpus.txt")
    assert_ok(run_forked(*TRAIN, "hydra.run.dir=run", cwd=work))
    return work


def table(stdout: str) -> dict[str, float]:
    """evaluate.py's two-column table (metric, value) as a mapping."""
    lines = stdout.strip().splitlines()
    assert lines[0].split() == ["metric", "value"], stdout
    return {name: float(value) for name, value in (line.split() for line in lines[1:])}


def last_val_bpb(run: Path) -> float:
    return [r["val/bpb"] for r in read_metrics(run) if "val/bpb" in r][-1]


def test_bpb_of_a_finished_run_is_its_last_val_bpb(work):
    done = run_forked("-m", "gpt.evaluate", "task=bpb", "ckpt=run", cwd=work)
    assert_ok(done)
    expected = last_val_bpb(work / "run")
    shown = table(done.stdout)
    assert list(shown) == ["bpb", "loss", "ppl"]
    assert shown["bpb"] == round(expected, 4)
    result = json.loads((work / "run/evals/bpb.json").read_text())
    assert result["task"] == "bpb" and result["step"] == 12
    assert result["metrics"]["bpb"] == pytest.approx(expected, rel=1e-5)
    val_loss = [r["val/loss"] for r in read_metrics(work / "run") if "val/loss" in r][-1]
    assert result["metrics"]["loss"] == pytest.approx(val_loss, rel=1e-5)
    # The windows train.py chose (data.val_windows=null: 512 here), recorded in the checkpoint.
    assert result["examples"] == 512 and result["tokens"] == 512 * 32
    assert "evaluating 512 val windows of the checkpoint's training data" in done.stderr


def test_bpb_on_another_corpus_every_token_once(work):
    done = run_forked(
        "evaluate.py", "task=bpb", "ckpt=run", "data=text", "data.path=corpus.txt", "windows=all", cwd=work
    )
    assert_ok(done)
    result = json.loads((work / "run/evals/bpb-corpus-all.json").read_text())
    assert table(done.stdout)["bpb"] == round(result["metrics"]["bpb"], 4)
    assert result["data"] == "corpus.txt" and result["windows"] == "all"
    # one byte per character token (the corpus is ASCII): every byte of the val split but the first
    assert result["bytes"] == result["tokens"] > 0
    limited = run_forked(
        "evaluate.py", "task=bpb", "ckpt=run", "data=text", "data.path=corpus.txt", "limit=3", cwd=work
    )
    assert_ok(limited)
    assert json.loads((work / "run/evals/bpb-corpus.json").read_text())["examples"] == 3


# Multiple-choice rows in Tiny Shakespeare's characters (a character model scores no other text).
SHAKESPEARE_MC = [
    {
        "context": "ROMEO: O, she doth teach the torches to burn",
        "choices": ["bright!", "blue.", "zzz"],
        "label": 0,
    },
    {"context": "JULIET: Wherefore art thou", "choices": ["Romeo?", "a table", "qx"], "label": 0},
    {"question": "To be, or not to be:", "options": ["that is the question.", "no"], "answer": 0},
]


def test_hellaswag_and_mc_files_then_compare_shows_them(work, tmp_path):
    """HellaSwag-format rows on a GPT-2-vocabulary checkpoint (random weights: the fixture's text is
    not all in Tiny Shakespeare's characters); mc rows, renamed fields included, on the trained run,
    whose results compare.py then shows beside bpb's."""
    from gpt.runs.checkpoint import save_weights_checkpoint
    from gpt.tokenizer import TiktokenTokenizer
    from tests.helpers import tiny_model

    bpe = TiktokenTokenizer("r50k_base")
    save_weights_checkpoint(tiny_model(vocab_size=bpe.vocab_size), bpe, work / "bpe/checkpoints/last.ckpt")
    done = run_forked("evaluate.py", "task=hellaswag", "ckpt=bpe", f"data.path={HELLASWAG}", cwd=work)
    assert_ok(done)
    shown = table(done.stdout)
    assert list(shown) == ["acc", "acc_norm", "chance"] and shown["chance"] == 25.0
    result = json.loads((work / "bpe/evals/hellaswag-hellaswag_mini.json").read_text())
    records = [
        json.loads(r) for r in (work / "bpe/evals/hellaswag-hellaswag_mini.jsonl").read_text().splitlines()
    ]
    assert result["examples"] == len(records) == len(HELLASWAG.read_text().splitlines())
    assert result["metrics"]["acc"] == pytest.approx(100 * sum(r["acc"] for r in records) / len(records))
    assert shown["acc_norm"] == round(result["metrics"]["acc_norm"], 2)

    (tmp_path / "plain.jsonl").write_text("".join(json.dumps(r) + "\n" for r in SHAKESPEARE_MC[:2]))
    (tmp_path / "renamed.jsonl").write_text(json.dumps(SHAKESPEARE_MC[2]) + "\n")
    done = run_forked(
        "-m",
        "gpt.evaluate",
        "task=mc",
        "ckpt=run",
        f"data.path={tmp_path / 'plain.jsonl'}",
        "batch_size=2",
        cwd=work,
    )
    assert_ok(done)
    mc = json.loads((work / "run/evals/mc-plain.json").read_text())
    assert mc["examples"] == 2 and mc["chance"] == pytest.approx(100 / 3)
    renamed = [
        "task=mc",
        "ckpt=run",
        f"data.path={tmp_path / 'renamed.jsonl'}",
        "data.fields={context: question, choices: options, label: answer}",
    ]
    assert_ok(run_forked("evaluate.py", *renamed, cwd=work))
    assert json.loads((work / "run/evals/mc-renamed.json").read_text())["chance"] == 50.0

    done = run_forked("compare.py", "runs=[run]", f"out={tmp_path}/plot.png", cwd=work)
    assert_ok(done)
    header, _, row = done.stdout.strip().splitlines()
    for column in ("mc-plain/acc_norm", "mc-renamed/acc"):
        assert column in header
    assert f"{mc['metrics']['acc']:.2f}" in row.split()


@pytest.fixture
def checkpoint_only(tmp_path, monkeypatch) -> Path:
    """A run dir holding only a small checkpoint, an empty data root, and no network."""
    from gpt.runs.checkpoint import save_weights_checkpoint
    from gpt.tokenizer import CharTokenizer
    from tests.helpers import CHARS, tiny_model

    tok = CharTokenizer(CHARS)
    save_weights_checkpoint(
        tiny_model(vocab_size=tok.vocab_size), tok, tmp_path / "run/checkpoints/last.ckpt"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GPT_DATA_DIR", str(tmp_path / "root"))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr("urllib.request.urlopen", offline)
    return tmp_path


def test_hellaswag_absent_offline_says_where_to_put_it(checkpoint_only, capsys):
    with pytest.raises(SystemExit) as exit_:
        evaluate(["task=hellaswag", "ckpt=run"])
    assert exit_.value.code == 2
    # the attempt, then the one error line; stdout (the table's) stays empty
    out, err = capsys.readouterr()
    attempt, error = err.strip().splitlines()
    assert attempt.startswith("HellaSwag's validation set not found in") and "downloading" in attempt
    assert (
        error.startswith("error: ")
        and f"put {choice.HELLASWAG_FILE} (from {choice.HELLASWAG_URL}) there" in error
    )
    assert out == ""
    assert not (checkpoint_only / "run/evals").exists()
    root = checkpoint_only / "root"
    assert not root.exists() or not any(root.iterdir())  # no partial download left behind


def test_hellaswag_corrupt_says_its_sha256_does_not_match(checkpoint_only, capsys):
    (checkpoint_only / "root").mkdir()
    (checkpoint_only / "root" / choice.HELLASWAG_FILE).write_text(HELLASWAG.read_text()[:500])
    assert_one_line_exit(evaluate, ["task=hellaswag", "ckpt=run"], "sha256", capsys)
    assert not (checkpoint_only / "run/evals").exists()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["task=mc"], "task=mc needs its questions: pass data.path=FILE.jsonl"),
        (["task=bpb", "data=pairs", "data.path=x.jsonl"], "task=bpb scores a text corpus"),
        (["task=hellaswag", "data=text", "data.path=x.txt"], "task=hellaswag reads a .jsonl file"),
        (
            ["task=mc", "data.path=x.jsonl", "data.fields={prompt: q}"],
            "task=mc rows have context, choices, label",
        ),
        (["task=squad"], "task='squad' is not one of generate, hellaswag, mc, bpb"),
        (["task=hellaswag", "data.path=nope.jsonl"], "data.path nope.jsonl is not a file"),
        (["task=mc", "data.path=nope.jsonl"], "data.path nope.jsonl is not a file"),
        (["task=bpb", "windows=some"], "windows='some' is not one of val, all"),
    ],
)
def test_bad_task_input_is_one_line(checkpoint_only, capsys, overrides, message):
    assert_one_line_exit(evaluate, ["ckpt=run", *overrides], message, capsys)
    assert not (checkpoint_only / "run/evals").exists()


def test_bpb_of_a_checkpoint_without_its_data_asks_for_a_corpus(checkpoint_only, capsys):
    assert_one_line_exit(evaluate, ["task=bpb", "ckpt=run"], "does not record its training data", capsys)


def test_the_callback_logs_a_task_to_csv_and_wandb_offline(tmp_path):
    env = {"HOME": str(tmp_path / "home"), "NETRC": str(tmp_path / "none")}
    rows = SHAKESPEARE_MC[:2] * 3  # 6 examples, in Tiny Shakespeare's characters
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    done = run_forked(
        *TRAIN,
        "logger=wandb",
        "hydra.run.dir=run",
        "callbacks.evaluate.every_n_steps=6",
        "callbacks.evaluate.task=mc",
        "callbacks.evaluate.path=mc.jsonl",
        "callbacks.evaluate.limit=5",
        cwd=tmp_path,
        env=env,
    )
    assert_ok(done)
    logged = [r for r in read_metrics(tmp_path / "run") if "eval/mc/acc" in r]
    assert [int(r["step"]) for r in logged] == [6, 12]
    assert all(r["eval/mc/acc"] in {0.0, 20.0, 40.0, 60.0, 80.0, 100.0} for r in logged)  # of 5 examples
    assert all("eval/mc/acc_norm" in r for r in logged)
    assert "callbacks.evaluate: task mc, 5 examples of mc.jsonl" in done.stderr + done.stdout
    (offline,) = (tmp_path / "run" / "wandb").glob("offline-run-*")
    (log,) = offline.glob("*.wandb")
    assert b"eval/mc/acc_norm" in log.read_bytes()


def test_a_row_the_model_cannot_score_stops_training_before_it_starts(tmp_path):
    done = run_forked(
        *TRAIN,
        "hydra.run.dir=run",
        "callbacks.evaluate.every_n_steps=6",
        "callbacks.evaluate.task=hellaswag",
        f"callbacks.evaluate.path={HELLASWAG}",
        cwd=tmp_path,
    )
    assert done.returncode == 2
    assert "hellaswag_mini.jsonl:1: choice 0 is 51 tokens, more than the model's block_size 32" in last_line(
        done.stderr
    )
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_under_ddp_the_callback_shares_out_and_sums_to_evaluate_py(tmp_path):
    """2 processes each score half of the windows; the summed bpb logged at the end equals
    evaluate.py's on the final checkpoint (the same weights), in one process."""
    write_corpus(tmp_path / "corpus.txt")
    done = run_forked(
        *TRAIN,
        "data.val_windows=16",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.strategy=ddp",
        "trainer.max_steps=4",
        "hydra.run.dir=run",
        "callbacks.evaluate.every_n_steps=100",
        "callbacks.evaluate.task=bpb",
        "callbacks.evaluate.path=corpus.txt",
        "callbacks.evaluate.limit=7",  # odd: the ranks' shares differ in size
        cwd=tmp_path,
        timeout=600,
    )
    assert_ok(done)
    (logged,) = [r for r in read_metrics(tmp_path / "run") if "eval/bpb/bpb" in r]
    assert int(logged["step"]) == 4
    single = run_forked(
        "evaluate.py", "task=bpb", "ckpt=run", "data=text", "data.path=corpus.txt", "limit=7", cwd=tmp_path
    )
    assert_ok(single)
    result = json.loads((tmp_path / "run/evals/bpb-corpus.json").read_text())
    assert result["examples"] == 7
    assert logged["eval/bpb/bpb"] == pytest.approx(result["metrics"]["bpb"], rel=1e-5)
    assert logged["eval/bpb/loss"] == pytest.approx(result["metrics"]["loss"], rel=1e-5)
