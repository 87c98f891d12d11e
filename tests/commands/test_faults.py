"""Faults in real train.py processes: SIGKILL during a step and during a checkpoint write, SIGTERM,
each followed by the same command, which must end equal to an uninterrupted run; NaN losses; a
second training on a busy run dir; a full or read-only output location."""

from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gpt.runs.checkpoint import newest_checkpoint
from gpt.train.resume import python_command
from tests.helpers import (
    ROOT,
    assert_ok,
    assert_same_weights,
    final_state,
    losses,
    run_script,
    train_cmd,
    write_corpus,
)

# The last step is not a periodic one (every 10): a resumed run must still end with it saved.
STEPS = 35
EXTRA = [
    f"trainer.max_steps={STEPS}",
    "trainer.val_check_interval=20",
    "callbacks.last.every_n_train_steps=10",
]
FAULTS = {"PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests' / 'commands' / 'fault_injection'}"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus") / "corpus.txt")


@pytest.fixture(scope="module")
def straight(corpus, tmp_path_factory) -> Path:
    """The uninterrupted run every interrupted one must end equal to."""
    run = tmp_path_factory.mktemp("straight") / "run"
    assert_ok(run_script(*train_cmd(corpus, run, *EXTRA), cwd=run.parent))
    return run


def assert_equals_straight(run: Path, straight: Path) -> None:
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == STEPS
    assert (run / "checkpoints" / f"step-{STEPS}.ckpt").is_file()
    assert_same_weights(final_state(run), final_state(straight))
    assert losses(run) == losses(straight)
    assert len(losses(run)) == STEPS


def snapshot(directory: Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def train_until(
    corpus: Path, run_dir: Path, extra: list[str], checkpoint: str, env: dict[str, str] | None = None
) -> subprocess.Popen:
    """Start training in the background; return once checkpoints/<checkpoint> exists (or, with a
    GPT_FAULT_MARKER in env, once that file does)."""
    cmd = [
        sys.executable,
        *(str(ROOT / a) if a.endswith(".py") else a for a in train_cmd(corpus, run_dir, *extra)),
    ]
    env = os.environ | {"PYTHONPATH": str(ROOT)} | (env or {})
    proc = subprocess.Popen(
        cmd, cwd=run_dir.parent, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    target = run_dir / "checkpoints" / checkpoint
    if "GPT_FAULT_MARKER" in env:
        target = Path(env["GPT_FAULT_MARKER"])
    deadline = time.time() + 300
    while not target.exists():
        assert proc.poll() is None and time.time() < deadline, "training ended before it could be stopped"
        time.sleep(0.02)
    return proc


def test_sigkill_during_a_step_then_same_command_resumes_bit_identical(corpus, straight, tmp_path):
    run = tmp_path / "killed"
    proc = train_until(corpus, run, EXTRA, "step-20.ckpt")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # The kill may land between two checkpoint files of one step: resume takes the newest file.
    interrupted_at = torch.load(newest_checkpoint(run), weights_only=True)["global_step"]
    assert 20 <= interrupted_at < STEPS

    assert_ok(run_script(*train_cmd(corpus, run, *EXTRA), cwd=tmp_path))  # the same command again
    assert_equals_straight(run, straight)
    assert len(list((run / "csv").glob("version_*"))) == 2


def test_sigkill_during_a_checkpoint_write_resumes_from_the_last_complete_one(corpus, straight, tmp_path):
    run, marker = tmp_path / "killed", tmp_path / "blocked"
    env = FAULTS | {"GPT_FAULT_BLOCK_SAVE": "step-20.ckpt", "GPT_FAULT_MARKER": str(marker)}
    proc = train_until(corpus, run, EXTRA, "", env=env)  # returns half-way through writing step-20

    # Meanwhile a second training on the same run dir is refused and changes nothing.
    before = snapshot(run)
    second = run_script(*train_cmd(corpus, run, *EXTRA), cwd=tmp_path)
    assert second.returncode == 2, second.stderr
    last = second.stderr.strip().splitlines()[-1]
    assert last.startswith("error: another training (pid ") and str(run) in last
    assert snapshot(run) == before

    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = Path(marker.read_text())
    assert partial.parent == run / "checkpoints" and partial.name.startswith(".step-20.ckpt.tmp-")
    assert partial.stat().st_size > 0 and not (run / "checkpoints" / "step-20.ckpt").exists()
    assert torch.load(newest_checkpoint(run), weights_only=True)["global_step"] == 10
    # A writer that is not atomic (a copy across filesystems) would leave the partial file under
    # its final name: it must be skipped too.
    shutil.copy(partial, run / "checkpoints" / "step-20.ckpt")

    resumed = run_script(*train_cmd(corpus, run, *EXTRA), cwd=tmp_path)  # lock released by the kill
    assert_ok(resumed)
    assert "skipping unreadable checkpoint" in resumed.stderr and "step-20.ckpt" in resumed.stderr
    assert "resuming from" in resumed.stdout and "last.ckpt" in resumed.stdout
    assert not partial.exists()  # the interrupted write's leftover is cleaned up
    assert_equals_straight(run, straight)


def test_sigterm_saves_exits_143_and_the_printed_command_resumes_bit_identical(corpus, straight, tmp_path):
    # The default run dir, runs/<date>/<time>/: the same command again would start a new run.
    args = [
        str(ROOT / "train.py"),
        *(a for a in train_cmd(corpus, tmp_path, *EXTRA)[1:] if "hydra.run" not in a),
    ]
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, *args],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 300
    while not (found := list(tmp_path.glob("runs/*/*/checkpoints/step-10.ckpt"))):
        assert proc.poll() is None and time.time() < deadline, "training ended before it could be stopped"
        time.sleep(0.02)
    run = found[0].parent.parent
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("stopped by SIGTERM at step ") and f"; checkpoint in {run}/checkpoints/;" in last
    command = last.split("; resume with: ", 1)[1]
    assert command == shlex.join([python_command(), *args, f"hydra.run.dir={run.relative_to(tmp_path)}"])
    assert (run / "checkpoints" / "on_exception.ckpt").is_file()

    assert_ok(
        subprocess.run(
            shlex.split(command), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
        )
    )
    assert_equals_straight(run, straight)
    assert list(tmp_path.glob("runs/*/*")) == [run]  # resumed in place, no new run dir
    assert not (run / "checkpoints" / "on_exception.ckpt").exists()  # removed once finished


def test_sigusr1_under_slurm_saves_requeues_and_the_relaunch_resumes(corpus, straight, tmp_path):
    """What SLURM does before a time limit (--signal=SIGUSR1@90 --requeue): SIGUSR1, then, once
    the job is requeued, SIGTERM; the requeued job runs the same command again."""
    bin_dir, requeued = tmp_path / "bin", tmp_path / "requeued"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" > {requeued}\n')
    (bin_dir / "scontrol").chmod(0o755)
    slurm = {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NAME": "gpt",
        "SLURM_NTASKS": "1",
        "SLURM_NTASKS_PER_NODE": "1",
        "SLURM_NODELIST": "localhost",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "0",
    }
    run = tmp_path / "slurm"
    proc = train_until(corpus, run, EXTRA, "step-10.ckpt", env=slurm)
    proc.send_signal(signal.SIGUSR1)
    deadline = time.time() + 120
    while not requeued.exists():
        assert proc.poll() is None and time.time() < deadline, "no requeue after SIGUSR1"
        time.sleep(0.02)
    assert requeued.read_text().split() == ["requeue", "4242"]
    assert list(run.glob("hpc_ckpt_*.ckpt"))
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr[-3000:]
    assert_ok(run_script(*train_cmd(corpus, run, *EXTRA), cwd=tmp_path, env=slurm))  # the requeued job
    assert_equals_straight(run, straight)


NAN_RUN = ["trainer.max_steps=8", "trainer.val_check_interval=4", "callbacks.last.every_n_train_steps=2"]


def test_injected_nan_stops_naming_the_step_and_the_last_good_checkpoint(corpus, tmp_path):
    run = tmp_path / "nan"
    proc = run_script(
        *train_cmd(corpus, run, *NAN_RUN), cwd=tmp_path, env=FAULTS | {"GPT_FAULT_NAN_AT_STEP": "5"}
    )
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: non-finite loss at step 5;")
    good = newest_checkpoint(run)
    assert f"Last good checkpoint: {good}." in last
    saved = [torch.load(p, weights_only=True) for p in (run / "checkpoints").glob("*.ckpt")]
    assert max(c["global_step"] for c in saved) == 4  # nothing after the last finite step
    assert not (run / "checkpoints" / "on_exception.ckpt").exists()
    for c in saved:
        assert all(torch.isfinite(t).all() for t in c["state_dict"].values())


def test_injected_nan_is_skipped_when_asked(corpus, tmp_path):
    run = tmp_path / "skip"
    extra = [*NAN_RUN, "callbacks.nonfinite.action=skip", "callbacks.last.every_n_train_steps=1"]
    extra += ["callbacks.last.save_top_k=-1"]
    proc = run_script(
        *train_cmd(corpus, run, *extra), cwd=tmp_path, env=FAULTS | {"GPT_FAULT_NAN_AT_STEP": "5"}
    )
    assert_ok(proc)
    assert "step 5: non-finite loss, update skipped" in proc.stderr
    ckpt = {n: torch.load(run / "checkpoints" / f"step-{n}.ckpt", weights_only=True) for n in (5, 6, 7)}
    # Step 5's update was skipped: weights and optimizer moments after it are those before it.
    assert_same_weights(ckpt[6]["state_dict"], ckpt[5]["state_dict"])
    moments = [c["optimizer_states"][0]["state"] for c in (ckpt[5], ckpt[6])]
    assert moments[0].keys() == moments[1].keys()
    for k in moments[0]:
        assert_same_weights(moments[0][k], moments[1][k])
    with pytest.raises(AssertionError):  # while step 6 trained as usual
        assert_same_weights(ckpt[7]["state_dict"], ckpt[6]["state_dict"])
    assert all(torch.isfinite(t).all() for t in final_state(run).values())


@pytest.fixture
def small_mount(tmp_path):
    """Mount a 4 MB tmpfs (read-only with param "ro") at tmp_path/mnt: a full or read-only disk."""

    def mount(options: str) -> Path:
        where = tmp_path / f"mnt{len(mounted)}"
        where.mkdir()
        proc = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True
        )
        if proc.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode().strip()}")
        mounted.append(where)
        return where

    mounted: list[Path] = []
    if sys.platform != "linux" or shutil.which("mount") is None:
        pytest.skip("needs Linux mount")
    yield mount
    for where in mounted:
        subprocess.run(["umount", str(where)], check=False)


def test_full_or_read_only_output_is_reported_before_training(corpus, tmp_path, small_mount):
    full = small_mount("size=4m")
    proc = run_script(*train_cmd(corpus, full / "run", *EXTRA), cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert "MB free but 6 checkpoints of the model and its optimizer state need about" in last
    assert not (full / "run" / "checkpoints").exists() and not (full / "run" / "csv").exists()

    read_only = small_mount("ro,size=4m")
    proc = run_script(*train_cmd(corpus, read_only / "run", *EXTRA), cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: Read-only file system") and "choose another location" in last
