"""Faults in train.py processes of their own (forked off a warm Python, tests/forkserver.py):
SIGKILL during a step and during a checkpoint write, SIGTERM, Ctrl-C, SLURM's SIGUSR1, each followed
by the same command, which must end equal to an uninterrupted run; NaN losses; a second training on
a busy run dir; a full or read-only output location."""

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
from gpt.runs.metrics import read_metrics
from gpt.train.resume import python_command
from tests.helpers import (
    ROOT,
    Forked,
    assert_ok,
    assert_same_weights,
    final_state,
    losses,
    run_forked,
    start_forked,
    train_cmd,
    wait_for,
    write_corpus,
)

# Its tests share costly module fixtures: one xdist worker runs them all, the fixtures once.
pytestmark = pytest.mark.xdist_group(__name__)

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
    assert_ok(run_forked(*train_cmd(corpus, run, *EXTRA), cwd=run.parent))
    return run


def val_losses(run_dir: Path) -> dict[int, float]:
    return {int(r["step"]): r["val/loss"] for r in read_metrics(run_dir) if "val/loss" in r}


def assert_equals_straight(run: Path, straight: Path) -> None:
    """The same weights, the same training loss at every step, the same validations (steps and
    values) and the same token count as the uninterrupted run."""
    last = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == STEPS
    assert (run / "checkpoints" / f"step-{STEPS}.ckpt").is_file()
    assert_same_weights(last["state_dict"], final_state(straight))
    assert losses(run) == losses(straight)
    assert len(losses(run)) == STEPS
    assert val_losses(run) == val_losses(straight)
    assert len(val_losses(run)) == 2  # after steps 20 and 35
    straight_last = torch.load(straight / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["tokens_seen"] == straight_last["tokens_seen"] == STEPS * 16 * 32


def snapshot(directory: Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def train_until(
    corpus: Path, run_dir: Path, extra: list[str], checkpoint: str, env: dict[str, str] | None = None
) -> Forked:
    """Start training in the background; return once checkpoints/<checkpoint> exists (or, with a
    GPT_FAULT_MARKER in env, once that file does)."""
    proc = start_forked(*train_cmd(corpus, run_dir, *extra), cwd=run_dir.parent, env=env)
    marker = (env or {}).get("GPT_FAULT_MARKER")
    wait_for(Path(marker) if marker else run_dir / "checkpoints" / checkpoint, proc)
    return proc


def test_sigkill_during_a_step_then_same_command_resumes_bit_identical(corpus, straight, tmp_path):
    run = tmp_path / "killed"
    proc = train_until(corpus, run, EXTRA, "step-20.ckpt")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # The kill may land between two checkpoint files of one step: resume takes the newest file.
    interrupted_at = torch.load(newest_checkpoint(run), weights_only=True)["global_step"]
    assert 20 <= interrupted_at < STEPS

    assert_ok(run_forked(*train_cmd(corpus, run, *EXTRA), cwd=tmp_path))  # the same command again
    assert_equals_straight(run, straight)
    assert len(list((run / "csv").glob("version_*"))) == 2


def test_sigkill_during_a_checkpoint_write_resumes_from_the_last_complete_one(corpus, straight, tmp_path):
    run, marker = tmp_path / "killed", tmp_path / "blocked"
    env = FAULTS | {"GPT_FAULT_BLOCK_SAVE": "step-20.ckpt", "GPT_FAULT_MARKER": str(marker)}
    proc = train_until(corpus, run, EXTRA, "", env=env)  # returns half-way through writing step-20

    # Meanwhile a second training on the same run dir is refused and changes nothing.
    before = snapshot(run)
    second = run_forked(*train_cmd(corpus, run, *EXTRA), cwd=tmp_path)
    assert second.returncode == 2, second.stderr
    last = second.stderr.strip().splitlines()[-1]
    assert last.startswith("error: another training (pid ") and str(run) in last
    assert snapshot(run) == before

    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = Path(marker.read_text())
    assert partial.parent == run / "checkpoints" and partial.name.startswith(".step-20.ckpt.tmp-")
    assert partial.stat().st_size > 0 and not (run / "checkpoints" / "step-20.ckpt").exists()
    # The best checkpoint of step 20's validation was written just before (complete).
    assert newest_checkpoint(run) == run / "checkpoints" / "best-step=20.ckpt"
    # A writer that is not atomic (a copy across filesystems) would leave the partial file under
    # its final name: it must be skipped too.
    shutil.copy(partial, run / "checkpoints" / "step-20.ckpt")

    resumed = run_forked(*train_cmd(corpus, run, *EXTRA), cwd=tmp_path)  # lock released by the kill
    assert_ok(resumed)
    assert "skipping unreadable checkpoint" in resumed.stderr and "step-20.ckpt" in resumed.stderr
    assert f"resuming from {run}/checkpoints/best-step=20.ckpt" in resumed.stdout
    assert not partial.exists()  # the interrupted write's leftover is cleaned up
    assert_equals_straight(run, straight)


def test_sigterm_saves_exits_143_and_the_printed_command_resumes_bit_identical(corpus, straight, tmp_path):
    # The default run dir, runs/<date>/<time>/: the same command again would start a new run.
    args = [
        str(ROOT / "train.py"),
        *(a for a in train_cmd(corpus, tmp_path, *EXTRA)[1:] if "hydra.run" not in a),
    ]
    proc = start_forked(*args, cwd=tmp_path)
    deadline = time.time() + 300
    while not (found := list(tmp_path.glob("runs/*/*/checkpoints/step-10.ckpt"))):
        assert proc.poll() is None and time.time() < deadline, "training ended before it could be stopped"
        time.sleep(0.02)
    run = found[0].parent.parent
    proc.send_signal(signal.SIGTERM)
    stdout, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143
    last = stdout.strip().splitlines()[-1]
    saved = f", saved as {run}/checkpoints/on_exception.ckpt; continue with: "
    assert last.startswith("stopped by SIGTERM after step ") and saved in last
    assert last in (run / "train.log").read_text()
    command = last.split("; continue with: ", 1)[1]
    assert command == shlex.join([python_command(), *args, f"hydra.run.dir={run.relative_to(tmp_path)}"])
    assert (run / "checkpoints" / "on_exception.ckpt").is_file()

    assert_ok(run_forked(*shlex.split(command)[1:], cwd=tmp_path))  # the command after `python`
    assert_equals_straight(run, straight)
    assert list(tmp_path.glob("runs/*/*")) == [run]  # resumed in place, no new run dir
    assert not (run / "checkpoints" / "on_exception.ckpt").exists()  # removed once finished


@pytest.fixture
def slurm(tmp_path) -> tuple[dict[str, str], Path]:
    """The environment of a one-task SLURM job with a stand-in `scontrol`, and the file that
    scontrol writes its arguments to."""
    bin_dir, requeued = tmp_path / "bin", tmp_path / "requeued"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" > {requeued}\n')
    (bin_dir / "scontrol").chmod(0o755)
    env = {
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
    return env, requeued


def test_sigusr1_under_slurm_saves_requeues_and_the_relaunch_resumes(corpus, straight, tmp_path, slurm):
    """What SLURM does before a time limit (--signal=SIGUSR1@90 --requeue): SIGUSR1, then, once
    the job is requeued, SIGTERM; the requeued job runs the same command again."""
    slurm, requeued = slurm
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
    assert_ok(run_forked(*train_cmd(corpus, run, *EXTRA), cwd=tmp_path, env=slurm))  # the requeued job
    assert_equals_straight(run, straight)


def signalled(corpus: Path, run: Path, faults: str, exit_code: int, env: dict[str, str] | None = None):
    """train.py on `run` (the straight run's command), sending itself the signals of `faults`
    (GPT_FAULT_SIGNALS, see fault_injection/sitecustomize.py); it must exit with `exit_code`."""
    env = FAULTS | {"GPT_FAULT_SIGNALS": faults} | (env or {})
    proc = run_forked(*train_cmd(corpus, run, *EXTRA), cwd=run.parent, env=env)
    assert proc.returncode == exit_code, (
        f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    )
    for noise in ("Traceback", "weights_only", "Detected KeyboardInterrupt", "exists and is not empty"):
        assert noise not in proc.stdout + proc.stderr
    return proc


def continue_command(corpus: Path, run: Path) -> str:
    """What the stop line says to run: the command, as started (it names its hydra.run.dir)."""
    script, *args = train_cmd(corpus, run, *EXTRA)
    return shlex.join([python_command(), str(ROOT / script), *args])


def assert_stopped_after(proc, run: Path, step: int, what: str, corpus: Path) -> None:
    """The stop line: the last on the console, and in train.log; on_exception.ckpt of that step."""
    line = proc.stdout.strip().splitlines()[-1]
    checkpoint = run / "checkpoints" / "on_exception.ckpt"
    assert line == (
        f"stopped by {what} after step {step}, saved as {checkpoint}; "
        f"continue with: {continue_command(corpus, run)}"
    )
    assert line in (run / "train.log").read_text()
    assert torch.load(checkpoint, weights_only=True)["global_step"] == step


def test_ctrl_c_in_a_step_then_in_validation_resumes_bit_identical(corpus, straight, tmp_path):
    run = tmp_path / "ctrl-c"
    # In the training step of the 14th optimizer step: the step ends, then training stops.
    first = signalled(corpus, run, "INT@train:13", 130)
    assert "Ctrl-C: stopping after this step and saving a checkpoint" in first.stderr
    assert_stopped_after(first, run, 14, "Ctrl-C", corpus)
    # During the validation after step 20: the validation ends (and is logged), then training stops.
    second = signalled(corpus, run, "INT@val:20", 130)
    assert "resuming from" in second.stdout and "on_exception.ckpt" in second.stdout
    assert "validation at step 20: val/loss" in second.stdout
    assert_stopped_after(second, run, 20, "Ctrl-C", corpus)

    final = run_forked(*train_cmd(corpus, run, *EXTRA), cwd=tmp_path)
    assert_ok(final)
    assert "validation at step 20" not in final.stdout  # done before the stop, not repeated
    assert "exists and is not empty" not in final.stderr
    assert_equals_straight(run, straight)
    assert not (run / "checkpoints" / "on_exception.ckpt").exists()


def test_ctrl_c_while_a_checkpoint_is_written_then_sigterm_in_validation(corpus, straight, tmp_path):
    run = tmp_path / "during-save"
    first = signalled(corpus, run, "INT@save:step-10.ckpt", 130)
    assert_stopped_after(first, run, 10, "Ctrl-C", corpus)
    assert torch.load(run / "checkpoints" / "step-10.ckpt", weights_only=True)["global_step"] == 10
    # SIGTERM during a validation: Lightning's own handling cut it short, and the resumed run
    # never had it.
    second = signalled(corpus, run, "TERM@val:20", 143)
    assert_stopped_after(second, run, 20, "SIGTERM", corpus)

    assert_ok(run_forked(*train_cmd(corpus, run, *EXTRA), cwd=tmp_path))
    assert_equals_straight(run, straight)


@pytest.mark.parametrize(
    "second, when",
    [("INT@train:13", "during step 14"), ("INT@save:on_exception.ckpt", "while saving after step 14")],
    ids=["in-the-step", "while-saving"],
)
def test_a_second_ctrl_c_stops_at_once_and_the_run_continues_from_its_newest_checkpoint(
    corpus, straight, tmp_path, second, when
):
    run = tmp_path / "twice"
    proc = signalled(corpus, run, f"INT@train:13,{second}", 130)
    line = proc.stdout.strip().splitlines()[-1]
    newest = newest_checkpoint(run)
    assert line == (
        f"stopped at once by a second Ctrl-C {when}; continue from step 10 ({newest}) "
        f"with: {continue_command(corpus, run)}"
    )
    assert line in (run / "train.log").read_text()
    assert not (run / "checkpoints" / "on_exception.ckpt").exists()  # a half-taken step is not saved

    assert_ok(run_forked(*train_cmd(corpus, run, *EXTRA), cwd=tmp_path))
    assert_equals_straight(run, straight)


def test_sigkill_during_validation_resumes_with_that_validation(corpus, straight, tmp_path):
    """The periodic checkpoint of a validated step is written after its validation: a run killed
    during the validation resumes from the one before and validates again."""
    run = tmp_path / "killed-in-validation"
    signalled(corpus, run, "KILL@val:20", -signal.SIGKILL)
    assert not (run / "checkpoints" / "step-20.ckpt").exists()
    assert torch.load(newest_checkpoint(run), weights_only=True)["global_step"] == 10

    assert_ok(run_forked(*train_cmd(corpus, run, *EXTRA), cwd=tmp_path))
    assert_equals_straight(run, straight)


def test_slurm_requeue_signal_in_a_step_saves_after_it(corpus, straight, tmp_path, slurm):
    """SIGUSR1 in the middle of a step: Lightning saved hpc_ckpt_N.ckpt from inside the handler,
    half-way through the step; here it is saved once the step has ended. Killed before SLURM's
    SIGTERM, the requeued job resumes from it, bit-identical."""
    env, requeued = slurm
    run = tmp_path / "usr1"
    signalled(corpus, run, "USR1@train:13,KILL@train:16", -signal.SIGKILL, env=env)
    assert requeued.read_text().split() == ["requeue", "4242"]
    (hpc,) = run.glob("hpc_ckpt_*.ckpt")
    assert torch.load(hpc, weights_only=True)["global_step"] == 14
    assert newest_checkpoint(run) == hpc

    resumed = run_forked(*train_cmd(corpus, run, *EXTRA), cwd=tmp_path, env=env)
    assert_ok(resumed)
    assert f"resuming from {hpc}" in resumed.stdout
    assert_equals_straight(run, straight)


NAN_RUN = ["trainer.max_steps=8", "trainer.val_check_interval=4", "callbacks.last.every_n_train_steps=2"]


def test_injected_nan_stops_naming_the_step_and_the_last_good_checkpoint(corpus, tmp_path):
    run = tmp_path / "nan"
    proc = run_forked(
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
    proc = run_forked(
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
    proc = run_forked(*train_cmd(corpus, full / "run", *EXTRA), cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert "MB free but 6 checkpoints of the model and its optimizer state need about" in last
    assert not (full / "run" / "checkpoints").exists() and not (full / "run" / "csv").exists()

    read_only = small_mount("ro,size=4m")
    proc = run_forked(*train_cmd(corpus, read_only / "run", *EXTRA), cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: Read-only file system") and "choose another location" in last
