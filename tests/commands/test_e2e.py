"""Real subprocess runs of train.py and generate.py, as a user types them."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gpt.runs.checkpoint import load_model
from gpt.runs.metrics import read_metrics
from gpt.train.loggers import wandb_fields
from tests.helpers import (
    ROOT,
    assert_ok,
    assert_same_weights,
    last_line,
    run_forked,
    run_script,
    train_args,
    write_corpus,
)

# Its tests share costly module fixtures: one xdist worker runs them all, the fixtures once.
pytestmark = pytest.mark.xdist_group(__name__)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """One short training run in a fresh working directory; returns that directory."""
    work = tmp_path_factory.mktemp("work")
    write_corpus(work / "corpus.txt")
    # Periodic checkpoints every 5 steps of 12: the final step is not one of them.
    proc = run_forked(*train_args(work / "corpus.txt", "callbacks.last.every_n_train_steps=5"), cwd=work)
    assert_ok(proc)
    return work


def run_dir_of(work: Path) -> Path:
    (ckpt,) = work.glob("runs/*/*/checkpoints/last.ckpt")
    return ckpt.parent.parent


def test_train_writes_checkpoints_metrics_and_config(trained):
    run = run_dir_of(trained)
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert len(list((run / "checkpoints").glob("best-step=*.ckpt"))) == 1
    assert (run / ".hydra" / "config.yaml").is_file()
    rows = read_metrics(run)
    val = [r["val/loss"] for r in rows if "val/loss" in r]
    train_loss = [r["train/loss"] for r in rows if "train/loss" in r]
    assert len(val) == 2 and len(train_loss) == 6
    assert val[-1] < 4.0  # ln(vocab) is ~4.1 for this corpus: it learned something


def test_checkpoint_is_plain_data(trained):
    ckpt = torch.load(run_dir_of(trained) / "checkpoints" / "last.ckpt", weights_only=True)
    hp = ckpt["hyper_parameters"]
    assert hp["model"]["n_layer"] == 4 and hp["model"]["block_size"] == 32
    assert hp["tokenizer"]["kind"] == "char"
    assert ckpt["global_step"] == 12
    model, tok = load_model(run_dir_of(trained))
    assert model.config.vocab_size == tok.vocab_size == len(hp["tokenizer"]["chars"])


def test_the_final_step_is_saved_and_generate_names_it(trained):
    run = run_dir_of(trained)
    ckpts = run / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("step-*.ckpt")) == ["step-10.ckpt", "step-12.ckpt"]
    last, final = (torch.load(ckpts / name, weights_only=True) for name in ("last.ckpt", "step-12.ckpt"))
    assert last["global_step"] == final["global_step"] == 12
    assert_same_weights(last["state_dict"], final["state_dict"])

    proc = run_forked("generate.py", f"ckpt={run}", "max_new_tokens=5", cwd=trained)
    assert_ok(proc)
    assert f"checkpoint: {ckpts / 'last.ckpt'} (step 12)" in proc.stderr.splitlines()
    assert "checkpoint:" not in proc.stdout
    assert proc.stdout.endswith("\n") and len(proc.stdout) == len("\n") + 5 + 1  # prompt "\n", 5 chars


def test_generate_streams_from_newest_run(trained):
    proc = run_forked("generate.py", "prompt=ROMEO:", "max_new_tokens=50", "seed=7", cwd=trained)
    assert_ok(proc)
    assert proc.stdout.startswith("ROMEO:")
    assert len(proc.stdout) == len("ROMEO:") + 50 + 1  # char model: one character per token
    again = run_forked("generate.py", "prompt=ROMEO:", "max_new_tokens=50", "seed=7", cwd=trained)
    assert again.stdout == proc.stdout


def test_unquoted_special_characters_say_how_to_quote(trained):
    proc = run_forked("generate.py", "prompt=Où?", cwd=trained)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        """error: could not parse the override 'prompt=Où?'; put the value in quotes inside the """
        """argument: 'prompt="Où?"', or for any text, quotes and apostrophes included: prompt=- reads """
        """it from stdin (echo "Où?" | python generate.py prompt=-), prompt_file=FILE from a file (one """
        "per line)"
    ]


@pytest.mark.parametrize("prompt", ["ROMEO, come", "I'll hear it, sir: yet", "'tis"])
def test_a_prompt_hydra_cannot_read_gets_forms_that_work(trained, prompt, tmp_path):
    """prompt="..." as the shell passes it on (quotes gone): every form the error line offers
    continues exactly that prompt."""
    proc = run_forked("generate.py", f"prompt={prompt}", cwd=trained)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    settings = ("max_new_tokens=5", "temperature=0")
    quoted = re.search(r"in quotes inside the argument: '(.*?)', or", line)
    assert (quoted is None) == ("'" in prompt)  # an apostrophe cannot be quoted on a command line
    if quoted:
        assert_continues(run_forked("generate.py", quoted[1], *settings, cwd=trained), prompt)
    echo = re.search(r"\((echo .*) \| python generate\.py prompt=-\)", line)[1]
    command = " ".join(map(shlex.quote, [sys.executable, str(ROOT / "generate.py"), "prompt=-", *settings]))
    piped = subprocess.run(
        f"{echo} | {command}", shell=True, cwd=trained, capture_output=True, text=True, timeout=300
    )
    assert_continues(piped, prompt)
    assert "prompt_file=FILE from a file (one per line)" in line
    (tmp_path / "prompts.txt").write_text(prompt + "\n", encoding="utf-8")
    prompt_file = f"prompt_file={tmp_path / 'prompts.txt'}"
    assert_continues(run_forked("generate.py", prompt_file, *settings, cwd=trained), prompt)


def assert_continues(proc, prompt: str) -> None:
    assert_ok(proc)
    assert proc.stdout.startswith(prompt) and len(proc.stdout) == len(prompt) + 5 + 1


def test_generate_with_explicit_checkpoint_and_samples(trained):
    ckpt = run_dir_of(trained) / "checkpoints" / "last.ckpt"
    proc = run_forked(
        "generate.py",
        f"ckpt={ckpt}",
        "prompt=To be",
        "max_new_tokens=20",
        "num_samples=2",
        "temperature=0",
        cwd=trained.parent,
    )
    assert_ok(proc)
    first, second = proc.stdout.split("\n---------------\n")
    assert first == second.rstrip("\n")  # greedy: both samples equal
    assert first.startswith("To be") and len(first) == len("To be") + 20


def test_generate_imports_no_lightning(trained):
    code = (
        "import sys, generate;"
        "generate.sample(generate.GenerateConfig(max_new_tokens=3));"
        "loaded = [m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning')];"
        "assert not loaded, loaded"
    )
    proc = run_script("-c", code, cwd=trained)
    assert_ok(proc)


def test_resume_from_checkpoint_continues_steps(trained, tmp_path):
    run = run_dir_of(trained)
    proc = run_forked(
        *train_args(
            trained / "corpus.txt",
            "trainer.max_steps=16",
            f"ckpt_path={run}/checkpoints/last.ckpt",
            f"hydra.run.dir={tmp_path}/resumed",
        ),
        cwd=trained,
    )
    assert_ok(proc)
    ckpt = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 16


def test_unknown_key_is_one_line_and_nonzero(tmp_path):
    proc = run_forked("train.py", "model.n_layr=2", cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "model.n_layr" in lines[0] and lines[0].startswith("error:")
    assert not (tmp_path / "runs").exists()


def test_generate_without_any_run_says_how_to_get_one(tmp_path):
    # The other bad inputs of every command: tests/commands/test_bad_input.py.
    proc = run_forked("generate.py", cwd=tmp_path)
    assert proc.returncode == 2 and "no checkpoint under runs/" in last_line(proc.stderr)


def test_bf16_mixed_on_cpu(tiny_corpus, tmp_path):
    proc = run_forked(
        *train_args(
            tiny_corpus,
            "trainer.precision=bf16-mixed",
            "trainer.max_steps=4",
            f"hydra.run.dir={tmp_path}/run",
        ),
        cwd=tmp_path,
    )
    assert_ok(proc)
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["state_dict"]["model.wte.weight"].dtype == torch.float32  # master weights stay fp32


def test_ddp_two_processes_one_run_dir(ddp_run):
    """The conftest's ddp_run: both ranks write to the one default run dir (runs/<date>/<time>)."""
    runs = list((ddp_run / "runs").glob("*/*"))
    assert len(runs) == 1, runs
    assert [p.name for p in (runs[0] / "checkpoints").glob("last*.ckpt")] == ["last.ckpt"]
    assert torch.load(runs[0] / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 10


def test_wandb_offline_without_account_and_continued_on_resume(tiny_corpus, tmp_path):
    # No account: no key, no netrc, no mode chosen by the user.
    env = {"HOME": str(tmp_path / "home"), "NETRC": str(tmp_path / "none")}
    run = tmp_path / "run"
    for steps in (4, 6):  # the second command resumes the first run
        proc = run_forked(
            *train_args(tiny_corpus, "logger=wandb", f"trainer.max_steps={steps}", f"hydra.run.dir={run}"),
            cwd=tmp_path,
            env=env,
            unset=("WANDB_MODE", "WANDB_API_KEY"),
        )
        assert_ok(proc)
    offline = sorted((run / "wandb").glob("offline-run-*"))
    assert len(offline) == 2, offline
    run_ids = {p.name.rsplit("-", 1)[1] for p in offline}
    assert run_ids == {wandb_fields([], run)["id"]}  # one wandb run, continued
    assert len(read_metrics(run)) > 0  # CSV is always written
