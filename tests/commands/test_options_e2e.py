"""The speedrun options (qk_norm, ffn=relu2, logit_softcap, zero_init_proj, tie_embeddings=false,
value_embeds), all at once, through the commands: a SIGKILL and the same command again ends
bit-identical to an uninterrupted run; the checkpoint alone carries them (generate.py, evaluate.py
task=bpb equal to the run's own validation); init_from loads the weights exactly; 2-process DDP
equals one process. Each option alone, on the model: tests/model/test_speedrun_options.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpt.runs.checkpoint import load_model
from gpt.runs.metrics import read_metrics
from tests.helpers import (
    assert_ddp_equals_one,
    assert_ok,
    assert_same_weights,
    final_state,
    kill_then_resume,
    losses,
    run_forked,
    train_cmd,
    write_corpus,
)

# Each module run trains several times (about a minute on 2 cores): the slow tier, which CI runs too.
pytestmark = [pytest.mark.xdist_group(__name__), pytest.mark.slow]

OPTIONS = [
    "model.pos_emb=rope",
    "model.qk_norm=true",
    "model.ffn=relu2",
    "model.logit_softcap=15",
    "model.zero_init_proj=true",
    "model.tie_embeddings=false",
    "model.value_embeds=true",
]
STEPS = 24
EXTRA = [
    f"trainer.max_steps={STEPS}",
    "trainer.val_check_interval=12",
    "callbacks.last.every_n_train_steps=8",
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus") / "corpus.txt")


@pytest.fixture(scope="module")
def straight(corpus, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("options") / "run"
    assert_ok(run_forked(*train_cmd(corpus, run, *OPTIONS, *EXTRA), cwd=run.parent))
    return run


def test_sigkill_then_the_same_command_ends_bit_identical(corpus, straight, tmp_path):
    run = tmp_path / "killed"
    kill_then_resume(train_cmd(corpus, run, *OPTIONS, *EXTRA), run, tmp_path, 8, STEPS)
    assert_same_weights(final_state(run), final_state(straight))  # bit-identical
    assert losses(run) == losses(straight) and len(losses(run)) == STEPS


def test_the_checkpoint_alone_generates_and_scores_as_its_validation(straight, tmp_path):
    model, _ = load_model(straight)
    c = model.config
    assert (c.qk_norm, c.ffn, c.logit_softcap, c.zero_init_proj, c.tie_embeddings, c.value_embeds) == (
        True,
        "relu2",
        15.0,
        True,
        False,
        True,
    )
    proc = run_forked(
        "generate.py", f"ckpt={straight}", "prompt=ROMEO:", "max_new_tokens=20", "seed=1", cwd=tmp_path
    )
    assert_ok(proc)
    assert proc.stdout.startswith("ROMEO:") and len(proc.stdout) > len("ROMEO:") + 10
    proc = run_forked("evaluate.py", f"ckpt={straight}", "task=bpb", cwd=tmp_path)
    assert_ok(proc)
    logged = [r["val/bpb"] for r in read_metrics(straight) if "val/bpb" in r][-1]
    bpb = float(next(line.split()[1] for line in proc.stdout.splitlines() if line.startswith("bpb")))
    assert bpb == pytest.approx(logged, rel=1e-4)


def test_init_from_loads_the_weights_exactly(corpus, straight, tmp_path):
    """A new run from the trained one's weights; lr 1e-30 leaves them as loaded."""
    init = [f"init_from={straight}", "trainer.max_steps=2", "optim.lr=1e-30", "optim.warmup_steps=0"]
    proc = run_forked(*train_cmd(corpus, tmp_path / "next", *init), cwd=tmp_path)
    assert_ok(proc)
    assert_same_weights(final_state(straight), final_state(tmp_path / "next"), atol=1e-6)


def test_ddp_on_two_processes_equals_one(corpus, tmp_path):
    """The same 6 steps of 4 windows: one process, and 2 DDP ranks of 2 windows each."""
    common = [*OPTIONS, "trainer.max_steps=6", "model.dropout=0.0", "trainer.accelerator=cpu"]
    assert_ddp_equals_one(lambda run, *extra: train_cmd(corpus, run, *common, *extra), tmp_path, steps=6)
