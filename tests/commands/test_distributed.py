"""Strategies rehearsed on CPU with real processes (gloo): FSDP2 (trainer=fsdp2) against DDP, its
checkpoint and its resume after a SIGKILL; and a two-node torchrun launch simulated on one machine
(scripts/torchrun.sh twice, one process per node), killed on one node and resumed by the same
commands. Each launch of two processes takes 30-60 s on two shared cores: all are marked slow."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gpt.runs.checkpoint import load_model, newest_checkpoint
from tests.helpers import (
    ROOT,
    assert_ok,
    assert_same_weights,
    final_state,
    free_port,
    losses,
    run_script,
    train_cmd,
    write_corpus,
)

pytestmark = pytest.mark.slow

STEPS = 10
TWO_CPUS = [
    f"trainer.max_steps={STEPS}",
    "trainer.log_every_n_steps=1",
    "trainer.val_check_interval=10",
    "callbacks.last.every_n_train_steps=5",
    "trainer.accelerator=cpu",
    "trainer.precision=32-true",
    "trainer.devices=2",
]
# FSDP2 reduces gradients with reduce-scatter where DDP all-reduces: the same sums in another order.
# Measured: train/loss within 2.4e-7 over 10 steps, weights within 1.2e-7 (fp32).
ATOL = 1e-5


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus") / "corpus.txt")


def env() -> dict[str, str]:
    return os.environ | {"PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}


def start(cmd: list[str], cwd: Path, extra_env: dict[str, str] | None = None) -> subprocess.Popen:
    """In its own session, so that killpg takes it and every process it started, as a machine dying
    would."""
    return subprocess.Popen(
        cmd,
        cwd=cwd,
        env=env() | (extra_env or {}),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def finish(proc: subprocess.Popen, timeout: float = 600) -> None:
    _, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{err[-4000:]}"


def train(corpus: Path, run: Path, *extra: str) -> subprocess.Popen:
    args = train_cmd(corpus, run, *extra)
    cmd = [sys.executable, *(str(ROOT / a) if a.endswith(".py") else a for a in args)]
    return start(cmd, run.parent)


def descendants(pid: int) -> list[int]:
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            children.append(int(stat.parent.name))
    return [c for child in children for c in (child, *descendants(child))]


def kill_after(proc: subprocess.Popen, checkpoint: Path, timeout: float = 300) -> None:
    """SIGKILL `proc` and every process under it once `checkpoint` exists, as a machine dying would
    (torchrun starts its workers in sessions of their own)."""
    deadline = time.time() + timeout
    while not checkpoint.exists():
        if proc.poll() is not None:
            raise AssertionError(f"exit {proc.returncode} before {checkpoint}:\n{proc.stderr.read()[-3000:]}")
        assert time.time() < deadline, f"no {checkpoint} after {timeout} s"
        time.sleep(0.02)
    pids = [proc.pid, *descendants(proc.pid)]
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    proc.wait()


def test_fsdp2_on_two_cpus_matches_ddp_saves_full_weights_and_resumes(corpus, tmp_path):
    ddp, fsdp, killed = tmp_path / "ddp", tmp_path / "fsdp", tmp_path / "killed"
    finish(train(corpus, ddp, *TWO_CPUS, "trainer.strategy=ddp"))
    finish(train(corpus, fsdp, *TWO_CPUS, "trainer=fsdp2"))

    assert len(losses(fsdp)) == STEPS
    assert losses(fsdp).keys() == losses(ddp).keys()
    for step, loss in losses(ddp).items():
        assert losses(fsdp)[step] == pytest.approx(loss, abs=ATOL), step

    # One file with the full state dict, as DDP writes; generate.py's loader reads it.
    last = fsdp / "checkpoints" / "last.ckpt"
    assert last.is_file() and torch.load(last, weights_only=True)["global_step"] == STEPS
    assert_same_weights(final_state(fsdp), final_state(ddp), atol=ATOL)
    model, _ = load_model(last)
    ddp_model, _ = load_model(ddp / "checkpoints" / "last.ckpt")
    assert_same_weights(model.state_dict(), ddp_model.state_dict(), atol=ATOL)
    generated = run_script("generate.py", f"ckpt={fsdp}", "max_new_tokens=5", cwd=tmp_path)
    assert_ok(generated)

    # Killed after the step-5 checkpoint (every process at once), then the same command again.
    proc = train(corpus, killed, *TWO_CPUS, "trainer=fsdp2")
    kill_after(proc, killed / "checkpoints" / "step-5.ckpt")
    assert 5 <= torch.load(newest_checkpoint(killed), weights_only=True)["global_step"] < STEPS
    finish(train(corpus, killed, *TWO_CPUS, "trainer=fsdp2"))
    assert losses(killed) == losses(fsdp)
    assert_same_weights(final_state(killed), final_state(fsdp))


def two_nodes(corpus: Path, run: Path, port: int) -> list[subprocess.Popen]:
    """scripts/torchrun.sh on two simulated nodes of this machine, one CPU process each."""
    args = [
        *train_cmd(corpus, run)[1:],  # BASE and the run dir, after the script's own overrides
        f"data.cache_dir={run.parent / 'cache'}",
        "trainer.max_steps=10",
        "trainer.log_every_n_steps=1",
        "trainer.val_check_interval=10",
        "callbacks.last.every_n_train_steps=5",
        "trainer.accelerator=cpu",
    ]
    script = ["bash", str(ROOT / "scripts" / "torchrun.sh"), *args]
    common = {"RUN": "-", "NODES": "2", "GPUS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    return [start(script, run.parent, common | {"NODE_RANK": rank}) for rank in ("0", "1")]


def test_two_nodes_on_one_machine_one_run_dir_killed_node_resumes(corpus, tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    for proc in two_nodes(corpus, straight, free_port()):
        finish(proc)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "straight"]  # one run dir
    assert torch.load(straight / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 10
    assert sorted(losses(straight)) == list(range(10))
    assert len(list((straight / "csv").glob("version_*"))) == 1  # one run, logged by rank 0

    node0, node1 = two_nodes(corpus, killed, free_port())
    kill_after(node1, killed / "checkpoints" / "step-5.ckpt")  # node 1 dies
    node0.communicate(timeout=300)
    assert node0.returncode != 0  # node 0 fails instead of hanging
    assert 5 <= torch.load(newest_checkpoint(killed), weights_only=True)["global_step"] < 10

    for proc in two_nodes(corpus, killed, free_port()):  # the same commands again
        finish(proc)
    assert torch.load(killed / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 10
    assert losses(killed) == losses(straight)
    assert_same_weights(final_state(killed), final_state(straight))


def test_ctrl_c_on_one_rank_stops_both_after_the_same_step_and_resumes_bit_identical(corpus, tmp_path):
    """Ctrl-C reaching only rank 1 (a `kill -INT` of one process): the ranks agree on the next
    logging step (every 2nd here) and both stop after it; the same command again ends equal to the
    uninterrupted run."""
    ddp = [*TWO_CPUS, "trainer.strategy=ddp", "trainer.log_every_n_steps=2"]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    finish(train(corpus, straight, *ddp))

    faults = {
        "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests' / 'commands' / 'fault_injection'}",
        "GPT_FAULT_SIGNALS": "INT@train:2",  # in optimizer step 3, which is no logging step
        "GPT_FAULT_RANK": "1",
    }
    proc = run_script(*train_cmd(corpus, stopped, *ddp), cwd=tmp_path, env=faults, timeout=600)
    assert proc.returncode == 130, proc.stderr[-3000:]
    line = proc.stdout.strip().splitlines()[-1]
    assert line.startswith(
        f"stopped by Ctrl-C after step 4, saved as {stopped}/checkpoints/on_exception.ckpt;"
    )
    assert torch.load(stopped / "checkpoints" / "on_exception.ckpt", weights_only=True)["global_step"] == 4

    finish(train(corpus, stopped, *ddp))
    assert losses(stopped) == losses(straight) and len(losses(stopped)) == STEPS // 2
    assert_same_weights(final_state(stopped), final_state(straight))
