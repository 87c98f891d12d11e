"""Faults in real train.py processes: SIGKILL during a step and during a checkpoint write, SIGTERM,
each followed by the same command, which must end equal to an uninterrupted run; NaN losses; a
second training on a busy run dir; a full or read-only output location."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.demos.boring_classes import BoringModel

from gpt.config import ModelConfig, OptimConfig
from gpt.errors import NonFiniteError, UserError
from gpt.runs.checkpoint import newest_checkpoint
from gpt.tokenizer import CharTokenizer
from gpt.train.callbacks import NonFiniteGuard
from gpt.train.checkpointing import AtomicCheckpointIO, PeriodicCheckpoint
from gpt.train.lit_module import GPTLitModule
from gpt.train.resume import python_command
from gpt.train.rundir import RunLock, check_free_space, is_launch_rank_zero, same_file
from tests.commands.test_train import assert_same_weights, final_state, losses, ok, train_cmd
from tests.conftest import ROOT, SHAKESPEARE, run_script

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
    if not SHAKESPEARE.is_file():
        pytest.skip(f"{SHAKESPEARE} not found; set GPT_DATA_DIR")
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(SHAKESPEARE.read_text(encoding="utf-8")[:40_000], encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def straight(corpus, tmp_path_factory) -> Path:
    """The uninterrupted run every interrupted one must end equal to."""
    run = tmp_path_factory.mktemp("straight") / "run"
    ok(run_script(*train_cmd(corpus, run, *EXTRA), cwd=run.parent))
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

    ok(run_script(*train_cmd(corpus, run, *EXTRA), cwd=tmp_path))  # the same command again
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
    ok(resumed)
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

    ok(
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
    ok(run_script(*train_cmd(corpus, run, *EXTRA), cwd=tmp_path, env=slurm))  # the requeued job
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
    ok(proc)
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


def test_a_nonfinite_model_is_never_saved():
    module = GPTLitModule.from_configs(
        ModelConfig(n_layer=1, n_head=2, n_embd=8, block_size=8, vocab_size=3),
        OptimConfig(),
        CharTokenizer("abc"),
    )
    module.on_save_checkpoint({})  # finite: fine
    with torch.no_grad():
        module.model.lm_head.weight[0, 0] = float("inf")
    with pytest.raises(NonFiniteError, match="refusing to save"):
        module.on_save_checkpoint({})
    with pytest.raises(ValueError, match="use stop or skip"):
        NonFiniteGuard(action="ignore")


class EndAtStep5(L.Callback):
    """Ends training after step 5 of 10: normally (as early stopping would) or by an exception."""

    def __init__(self, fail: bool) -> None:
        self.fail = fail

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.global_step == 5:
            if self.fail:
                raise RuntimeError("injected")
            trainer.should_stop = True


@pytest.mark.parametrize("fail", [False, True], ids=["stopped", "failed"])
def test_last_checkpoint_is_the_final_step_only_of_a_normal_end(tmp_path, fail):
    checkpoint = PeriodicCheckpoint(
        dirpath=tmp_path, filename="step-{step}", monitor="step", mode="max", save_top_k=2,
        save_last=True, every_n_train_steps=4, auto_insert_metric_name=False,
    )  # fmt: skip
    trainer = L.Trainer(
        max_steps=10, callbacks=[EndAtStep5(fail), checkpoint], limit_val_batches=0, logger=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    if fail:
        with pytest.raises(RuntimeError, match="injected"):
            trainer.fit(BoringModel())
    else:
        trainer.fit(BoringModel())
    step = 4 if fail else 5  # an exception leaves the last periodic save as it was
    assert {p.name for p in tmp_path.iterdir()} == {"last.ckpt", "step-4.ckpt", f"step-{step}.ckpt"}
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["global_step"] == step


def test_run_lock_refuses_a_second_holder_and_is_released(tmp_path):
    busy = pytest.raises(UserError, match=r"another training \(pid \d+ on .*\) is running in")
    with RunLock(tmp_path), busy, RunLock(tmp_path):
        pass
    with RunLock(tmp_path):  # released on exit
        pass


def test_a_failed_start_removes_the_run_dir_it_made_and_nothing_else(tmp_path):
    def start(run: Path, fail: bool = True, write: str | None = None) -> None:
        with (
            pytest.raises(UserError) if fail else contextlib.nullcontext(),
            RunLock(run, cleanup_below=tmp_path),
        ):
            if write:
                (run / write).mkdir()
            if fail:
                raise UserError("bad input")

    (tmp_path / "runs" / "earlier").mkdir(parents=True)
    for day in ("today", "tomorrow"):  # as Hydra leaves it: the run dir and an empty log
        (tmp_path / "runs" / day / "12-00-00").mkdir(parents=True)
        (tmp_path / "runs" / day / "12-00-00" / "train.log").write_text("")
    start(tmp_path / "runs" / "today" / "12-00-00")
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["earlier", "tomorrow"]
    (tmp_path / "runs" / "earlier").rmdir()
    start(tmp_path / "runs" / "tomorrow" / "12-00-00")
    assert list(tmp_path.iterdir()) == []  # runs/ too: the walk stops at cleanup_below

    kept = {
        "succeeded": dict(fail=False),
        "wrote-more": dict(write="checkpoints"),  # failed after writing something: not only ours
        "older-file": dict(),  # a file older than this process: a run dir that existed before
    }
    for name in kept:
        (tmp_path / name).mkdir()
        (tmp_path / name / "train.log").write_text("")
    os.utime(tmp_path / "older-file" / "train.log", (0, 0))
    for name, how in kept.items():
        start(tmp_path / name, **how)
        assert (tmp_path / name / "train.log").is_file() and (tmp_path / name / "train.lock").is_file(), name
    with (
        pytest.raises(UserError),
        RunLock(tmp_path / "busy"),
        RunLock(tmp_path / "busy", cleanup_below=tmp_path),
    ):
        pass  # refused: the folder is another training's
    assert (tmp_path / "busy" / "train.lock").is_file()


def test_run_lock_locks_the_file_that_is_there(tmp_path):
    """A failed start deletes train.lock while holding it; a start that opened it meanwhile must
    not run on the deleted file beside a third one that locks a new train.lock."""
    with open(tmp_path / "train.lock", "a+") as f:
        assert same_file(f, tmp_path / "train.lock")
        (tmp_path / "train.lock").unlink()
        assert not same_file(f, tmp_path / "train.lock")


def test_only_rank_zero_takes_the_lock(monkeypatch):
    for name in ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert is_launch_rank_zero()
    for name in ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK"):
        monkeypatch.setenv(name, "1")
        assert not is_launch_rank_zero()
        monkeypatch.setenv(name, "0")
    assert is_launch_rank_zero()


def test_free_space_check(tmp_path, monkeypatch):
    check_free_space(tmp_path / "checkpoints", 1000, "checkpoints")  # not made yet: its parent's disk
    free = shutil.disk_usage(tmp_path).free
    with pytest.raises(UserError, match=r"MB free but 5 checkpoints need about .* MB; free some space"):
        check_free_space(tmp_path / "checkpoints", free * 2, "5 checkpoints")


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


def test_checkpoints_are_written_beside_their_target_and_renamed(tmp_path, monkeypatch):
    seen = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (seen.append((Path(a), Path(b))), real_replace(a, b)))
    AtomicCheckpointIO().save_checkpoint({"w": torch.ones(3)}, tmp_path / "ck" / "last.ckpt")
    ((tmp_name, target),) = seen
    assert tmp_name.parent == target.parent == tmp_path / "ck" and tmp_name.name.startswith(".last.ckpt.tmp-")
    assert torch.load(target, weights_only=True)["w"].tolist() == [1, 1, 1]
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["last.ckpt"]


def test_guard_skips_at_most_max_skips_steps_in_a_row(tmp_path):
    """Called as Lightning calls it: a step whose gradient is NaN is skipped (its gradients
    dropped) up to max_skips times in a row, then training stops; a finite step resets the count."""
    from types import SimpleNamespace

    layer = torch.nn.Linear(2, 2)
    trainer = SimpleNamespace(
        precision_plugin=SimpleNamespace(scaler=None),
        strategy=SimpleNamespace(reduce_boolean_decision=lambda decision, all: decision),
        global_step=7,
        default_root_dir=str(tmp_path),
    )
    module = SimpleNamespace(parameters=layer.parameters, device=torch.device("cpu"))
    guard = NonFiniteGuard(action="skip", max_skips=2)

    def step(grad: float) -> None:
        for p in layer.parameters():
            p.grad = torch.full_like(p, grad)
        guard.on_before_backward(trainer, module, torch.tensor(1.0))
        guard.on_before_optimizer_step(trainer, module, None)

    step(float("nan"))
    assert all(p.grad is None for p in layer.parameters())  # the update is skipped
    step(float("nan"))
    step(1.0)  # a finite step: grads kept, count reset
    assert all(p.grad is not None for p in layer.parameters())
    step(float("nan"))
    step(float("inf"))
    with pytest.raises(NonFiniteError, match="non-finite gradient at step 7 after 2 skipped steps in a row"):
        step(float("nan"))
