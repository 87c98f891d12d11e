"""The pairs runs that the pairs and seq2seq end-to-end tests share (tests/commands/test_pairs_e2e.py,
test_seq2seq_e2e.py): the train.py command on pairs, a task it learns in a few steps, and what a
resumed run must equal."""

from __future__ import annotations

import random
from pathlib import Path

import torch

from tests.helpers import assert_same_weights, final_state, losses

# As typed on a command line: a backslash and an n, which the template turns into a line break.
TEMPLATE = "Q: {prompt}\\nA: "
# conf/experiment/tiny.yaml on pairs, 32 wide, with dropout (a resume must restore its RNG) and a
# template whose effect shows in what generate.py prints.
PAIRS = [
    "experiment=tiny",
    "data=pairs",
    "model.n_embd=32",
    "model.dropout=0.1",
    f"data.template='{TEMPLATE}'",
    "~callbacks.progress_bar",
]
# Periodic checkpoints every 10 steps of 35 (the last step not one of them), a validation at 20:
# long enough for the model to learn to answer and stop.
STEPS = 35
EXTRA = [
    f"trainer.max_steps={STEPS}",
    "optim.lr=1e-2",
    "trainer.val_check_interval=20",
    "callbacks.last.every_n_train_steps=10",
]


def answered_ok(n: int, seed: int) -> list[dict[str, str]]:
    """A task learned in a few steps: each prompt, 1 to 12 digits, is answered "ok"."""
    rng = random.Random(seed)
    return [
        {"prompt": "".join(rng.choices("0123456789", k=rng.randint(1, 12))), "completion": "ok"}
        for _ in range(n)
    ]


def pairs_cmd(path: Path, run_dir: Path, *extra: str) -> list[str]:
    """train.py with PAIRS on `path` in `run_dir`, its data cached next to it."""
    cache = run_dir.parent / "cache"
    return [
        "train.py",
        *PAIRS,
        f"data.path={path}",
        f"data.cache_dir={cache}",
        f"hydra.run.dir={run_dir}",
        *extra,
    ]


def assert_equals_straight(run: Path, straight: Path) -> None:
    assert torch.load(run / "checkpoints/last.ckpt", weights_only=True)["global_step"] == STEPS
    assert_same_weights(final_state(run), final_state(straight))  # bit-identical
    assert losses(run) == losses(straight) and len(losses(run)) == STEPS
