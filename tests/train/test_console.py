"""What `python train.py` prints (gpt/train/console.py, gpt.train.callbacks.RunReport): each line once, on the
console and in train.log; no known-false warnings; a summary that matches the CSV log."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest

from gpt.runs.metrics import read_metrics
from tests.helpers import assert_ok, run_script, train_args, write_corpus

# A piece of each warning gpt/train/console.py and gpt/train/wandb_logger.py silence.
SILENCED = (
    "try installing [litlogger]",  # Lightning's advertisement, logged at every Trainer creation
    "`isinstance(treespec, LeafSpec)` is deprecated",  # torch, about Lightning's use of _pytree
    "The anonymous setting has no effect",  # wandb, about the None Lightning passes
    "your dataloader is not resumable",  # Lightning, on every resume; false for GPTDataModule
)
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
LOG_RECORD = re.compile(r"^\[\d{4}-\d\d-\d\d [\d:,]+\]\[([^\]]+)\]\[(\w+)\] - (.*)$")


def console_lines(*outputs: str) -> list[str]:
    """What a terminal shows, line by line: progress-bar redraws (\\r) and cursor moves removed."""
    text = ANSI.sub("", "\n".join(outputs))
    return [line.strip() for line in re.split(r"[\r\n]", text) if line.strip()]


def log_messages(train_log: Path) -> list[str]:
    """The first line of each record in train.log."""
    return [m.group(3) for line in train_log.read_text().splitlines() if (m := LOG_RECORD.match(line))]


@pytest.fixture(scope="module")
def fresh_and_resumed(tmp_path_factory) -> tuple[Path, list]:
    """A 6-step run with wandb (offline) and the same command again to 12 steps: (run dir, [procs])."""
    work = tmp_path_factory.mktemp("console")
    write_corpus(work / "corpus.txt")
    run, procs = work / "run", []
    for steps in (6, 12):
        args = train_args(
            work / "corpus.txt", "logger=wandb", f"trainer.max_steps={steps}", f"hydra.run.dir={run}"
        )
        proc = run_script(*args, cwd=work)
        assert_ok(proc)
        procs.append(proc)
    return run, procs


def test_each_logged_line_is_printed_once_and_known_false_warnings_are_gone(fresh_and_resumed):
    run, procs = fresh_and_resumed
    messages = Counter(log_messages(run / "train.log"))
    assert messages["Seed set to 1337"] == 2  # Lightning's lines are in train.log, once per start
    printed = Counter()
    for proc in procs:
        for piece in SILENCED:
            assert piece not in proc.stdout + proc.stderr
        lines = console_lines(proc.stdout, proc.stderr)
        # Neither Lightning's own handler ("INFO: ...") nor the file's format reach the console.
        assert not [line for line in lines if line.startswith("INFO:") or LOG_RECORD.match(line)]
        printed.update(line for line in lines if line in messages)
    # Every record of train.log was printed exactly once, in the start that logged it.
    assert printed == messages


def test_summary_on_the_console_and_in_train_log_matches_the_metrics(fresh_and_resumed):
    run, procs = fresh_and_resumed
    val = [row["val/loss"] for row in read_metrics(run) if "val/loss" in row]
    assert len(val) == 2
    log_text = (run / "train.log").read_text()
    for i, proc in enumerate(procs):  # the first run, then the resumed one
        steps, start = 6 * (i + 1), 6 * i
        resumed = re.escape(f" (resumed at step {start})") if start else ""
        pattern = (
            rf"training finished at step {steps}: 6 steps{resumed} in [\d.]+ s, ([\d,]+) training tokens\n"
            rf"  final val/loss ([\d.]+) at step {steps}, best ([\d.]+) at step (\d+)\n"
            r"  last checkpoint: (.+)\n"
            r"  best checkpoint: (.+)\n"
        )
        found = list(re.finditer(pattern, proc.stdout))
        assert len(found) == 1, proc.stdout[-1500:]
        summary = found[0]
        tokens, final, best, best_step, last_ckpt, best_ckpt = summary.groups()
        assert summary.group(0) in log_text
        assert int(tokens.replace(",", "")) == steps * 8 * 32  # batch 8 x block 32 per step
        assert float(final) == pytest.approx(val[i], abs=1e-4)
        so_far = val[: i + 1]
        assert float(best) == pytest.approx(min(so_far), abs=1e-4)
        assert int(best_step) == 6 * (so_far.index(min(so_far)) + 1)
        assert Path(last_ckpt) == run / "checkpoints" / "last.ckpt"
        assert Path(best_ckpt) == run / "checkpoints" / f"best-step={best_step}.ckpt"
    assert Path(best_ckpt).is_file()  # the resumed run's: the first run's best was replaced


def test_train_log_has_the_run_dir_and_each_validation(fresh_and_resumed):
    run, _ = fresh_and_resumed
    messages = log_messages(run / "train.log")
    val = [row for row in read_metrics(run) if "val/loss" in row]
    assert f"run dir: {run}" in messages
    assert [m for m in messages if m.startswith(f"run dir: {run}; resuming from {run}/checkpoints/")]
    logged = [m for m in messages if m.startswith("validation at step ")]
    assert len(logged) == len(val) == 2
    for line, step, row in zip(logged, (6, 12), val, strict=True):
        assert line.startswith(f"validation at step {step}: val/loss {row['val/loss']:.4f}, val/ppl ")
