"""What `python train.py` prints (gpt/train/console.py, gpt.train.callbacks.RunReport): each line once, on the
console and in train.log; no known-false warnings; a summary that matches the CSV log; to a file or a
pipe no progress bars, on a terminal the bars; one plain model summary, with or without rich installed."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
from collections import Counter
from pathlib import Path

import pytest
from lightning.pytorch.callbacks import ModelSummary as LightningModelSummary
from lightning.pytorch.callbacks import ProgressBar as LightningProgressBar

from gpt.runs.metrics import read_metrics
from gpt.train.callbacks import ModelSummary, ProgressBar
from tests.helpers import (
    FAST,
    ROOT,
    assert_ok,
    build_in_process,
    run_forked,
    run_script,
    train_args,
    write_corpus,
)

# The tests of each costly module fixture share an xdist group: one worker runs them, the fixture
# once. Two groups, so that two workers can make the two fixtures at the same time.
RESUMED = pytest.mark.xdist_group(f"{__name__}-resumed")
REDIRECTED = pytest.mark.xdist_group(f"{__name__}-redirected")

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
    """The first line of each record in train.log, stripped as console_lines strips it."""
    return [
        m.group(3).strip() for line in train_log.read_text().splitlines() if (m := LOG_RECORD.match(line))
    ]


# What only a progress bar prints: Lightning's bars and the data preparation's (gpt/data/prepare.py).
BAR_TEXT = (
    "it/s]",
    "Epoch 0:",
    "Training:",
    "Validation:",
    "Validation DataLoader",
    "characters:",
    "tokenizing:",
)
# Box-drawing characters: rich's tables (RichModelSummary).
BOX = re.compile("[\u2500-\u257f]")

# Code for `python -c` that hides rich from the process, as where the dev extras are not installed:
# `import rich` fails and importlib's find_spec (transformers asks it) and importlib.metadata (Lightning's
# RequirementCache asks it) find none.
HIDE_RICH = """
import importlib.metadata as metadata, runpy, sys

def from_name(cls, name, _from_name=metadata.Distribution.from_name.__func__):
    if name.lower() == "rich":
        raise metadata.PackageNotFoundError(name)
    return _from_name(cls, name)

sys.modules["rich"] = None
metadata.Distribution.from_name = classmethod(from_name)
"""
# After HIDE_RICH: what Lightning sees, and whether rich imports (printed).
HIDDEN = """
from lightning.pytorch.utilities.imports import _RICH_AVAILABLE
import importlib.util
try:
    import rich
except ModuleNotFoundError:
    rich = None
print(bool(_RICH_AVAILABLE), rich is not None, importlib.util.find_spec("rich") is not None)
"""
# After HIDE_RICH: run the script named next as __main__, with the arguments after it; then, in the
# same process, HIDDEN's lines to the file hidden.txt (not to stdout, which tests compare): what
# Lightning saw and whether rich imports, in the process that ran the script.
RUN_NEXT = f"""
import contextlib, os
hidden = os.path.abspath("hidden.txt")
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
with open(hidden, "w") as out, contextlib.redirect_stdout(out):
    exec({HIDDEN!r})
"""


def run_in_terminal(*args: str, cwd: Path, timeout: float = 300) -> tuple[int, str]:
    """run_script with stdin, stdout and stderr on a pseudo-terminal 160 columns wide: (exit code,
    what the terminal received)."""
    cmd = [sys.executable, *(str(ROOT / a) if a.endswith(".py") else a for a in args)]
    env = os.environ | {"PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    master, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=terminal, stdout=terminal, stderr=terminal)
    os.close(terminal)
    received, deadline = [], time.monotonic() + timeout
    try:
        while select.select([master], [], [], max(deadline - time.monotonic(), 0))[0]:
            try:
                chunk = os.read(master, 1 << 16)
            except OSError:  # EIO: every process holding the terminal has closed it
                break
            if not chunk:
                break
            received.append(chunk)
        else:
            proc.kill()
    finally:
        os.close(master)
    return proc.wait(timeout=60), b"".join(received).decode("utf-8", "replace")


def normalized(text: str, work: Path) -> str:
    """Output with what differs between two runs of one command in two folders masked: the folder,
    times, and the prepared data's fingerprint (it hashes the corpus's path)."""
    text = re.sub(r" in [\d.]+ s\b", " in ... s", text.replace(str(work), "WORK"))
    return re.sub(r"-[0-9a-f]{16}\b", "-FINGERPRINT", text)


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


@RESUMED
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


@RESUMED
def test_summary_on_the_console_and_in_train_log_matches_the_metrics(fresh_and_resumed):
    run, procs = fresh_and_resumed
    val = [row["val/loss"] for row in read_metrics(run) if "val/loss" in row]
    assert len(val) == 2
    log_text = (run / "train.log").read_text()
    for i, proc in enumerate(procs):  # the first run, then the resumed one
        steps, start = 6 * (i + 1), 6 * i
        resumed = re.escape(f" (resumed at step {start})") if start else ""
        pattern = (
            rf"training finished at step {steps}: 6 steps{resumed} in [\d.]+ s \(training and validation\), "
            r"([\d,]+) training tokens\n"
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


@RESUMED
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


@pytest.fixture(scope="module")
def redirected(tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess, Path]]:
    """A fresh 6-step run, its output to pipes as in `python train.py > out.log 2>&1`, and the same
    command in another folder with rich hidden: {"rich" | "no rich": (process, folder)}."""
    runs = {}
    for name, prefix in (("rich", []), ("no rich", ["-c", HIDE_RICH + RUN_NEXT])):
        work = tmp_path_factory.mktemp("redirected")
        args = train_args(write_corpus(work / "corpus.txt"), "trainer.max_steps=6", "hydra.run.dir=run")
        runs[name] = run_script(*prefix, *args, cwd=work), work
        assert_ok(runs[name][0])
    return runs


@REDIRECTED
def test_to_a_file_or_a_pipe_there_are_no_progress_bars_only_lines(redirected):
    """No redraws (\\r), no cursor moves, no bar, neither Lightning's nor the data preparation's; the
    lines a terminal would keep are all there."""
    for proc, _ in redirected.values():
        for text in (proc.stdout, proc.stderr):
            assert "\r" not in text and not ANSI.search(text), text[:3000]
            assert not [piece for piece in BAR_TEXT if piece in text], text[:3000]
        assert re.search(r"^prepared [\d,]+ tokens ", proc.stdout, re.MULTILINE)  # what the data bars did
        assert re.search(r"^validation at step 6: val/loss \d+\.\d{4}, ", proc.stdout, re.MULTILINE)
        assert re.search(r"^training finished at step 6: ", proc.stdout, re.MULTILINE)


@REDIRECTED
def test_the_model_summary_is_one_plain_table_of_the_model(redirected):
    proc, work = redirected["rich"]
    out = proc.stdout
    assert not BOX.search(out) and not re.search("flop|metric", out, re.IGNORECASE)
    lines = out.splitlines()
    header = re.compile(r" +\| Name +\| Type +\| Params +\| Mode")
    start = next(i for i, line in enumerate(lines) if header.fullmatch(line))
    rule = lines[start + 1]
    assert set(rule) == {"-"} and lines[start + 3] == rule
    assert re.fullmatch(r"0 \| model \| GPT  \| [\d.]+ K +\| train", lines[start + 2])  # the only row
    assert re.fullmatch(r"[\d.]+ K +Total params", lines[start + 6])
    assert "\n".join(lines[start : start + 10]) in (work / "run" / "train.log").read_text()  # logged


@REDIRECTED
def test_the_console_is_the_same_without_rich(redirected):
    """Lightning prints its model summary as a rich box table where it can import rich (the dev
    extras install it); train.py prints the same lines either way."""
    (with_rich, a), (without, b) = redirected["rich"], redirected["no rich"]
    # What Lightning saw in the run without rich; whether rich imports there, is found (RUN_NEXT).
    assert (b / "hidden.txt").read_text().split() == ["False"] * 3
    assert normalized(with_rich.stdout, a) == normalized(without.stdout, b)
    assert normalized(with_rich.stderr, a) == normalized(without.stderr, b)


# A pseudo-terminal run (~12 s): the slow tier, which CI runs too.
@pytest.mark.slow
def test_on_a_terminal_the_bars_are_drawn_with_four_decimals(tmp_path):
    write_corpus(tmp_path / "corpus.txt")
    code, shown = run_in_terminal(
        *train_args(tmp_path / "corpus.txt", "trainer.max_steps=6", "hydra.run.dir=run"), cwd=tmp_path
    )
    assert code == 0, shown[-3000:]
    assert not [piece for piece in BAR_TEXT if piece not in shown], shown[-3000:]
    assert "\r" in shown and ANSI.search(shown)
    bar = [line for line in console_lines(shown) if line.startswith("Epoch 0: 100%")][-1]
    four = r"\d+\.\d{4}"
    assert re.search(rf", loss={four}, val/loss={four}, val/ppl={four}, val/bpb={four}\]$", bar), bar
    lines = console_lines(shown)
    report = ("validation at step 6: ", "training finished at step 6: ")
    assert len([line for line in lines if line.startswith(report)]) == 2, lines  # as to a file


def test_lightnings_switches_decide_over_the_bar_and_the_summary(tiny_corpus, tmp_path):
    """trainer.enable_model_summary=false: no summary; otherwise only callbacks.model_summary (Lightning
    would add RichModelSummary where rich is installed). +trainer.enable_progress_bar=true: the bar is
    drawn to a file too; =false: no bar (tests/commands/test_train.py)."""

    def of(trainer, kind):
        return [c for c in trainer.callbacks if isinstance(c, kind)]

    def build(name, *overrides):
        return build_in_process(tiny_corpus, tmp_path / name, *overrides, base=FAST)[0]  # with the bar

    trainer = build("a")
    assert [type(c) for c in of(trainer, LightningModelSummary)] == [ModelSummary]
    (bar,) = of(trainer, LightningProgressBar)
    assert type(bar) is ProgressBar and bar.terminal_only
    assert not of(build("b", "trainer.enable_model_summary=false"), LightningModelSummary)
    (bar,) = of(build("c", "+trainer.enable_progress_bar=true"), LightningProgressBar)
    assert type(bar) is ProgressBar and not bar.terminal_only


def test_lightnings_false_lines_about_a_stop_are_dropped_whatever_was_imported_first():
    """train.py's logging config imports gpt.train.console before Lightning, which then renames the
    logger of its rank_zero_info: the filter must find the logger Lightning logs to. A child of the
    warm Python (run_forked): it has imported neither gpt nor Lightning, so the order is this code's."""
    code = (
        "import logging, sys\n"
        "import gpt.train.console as console\n"
        "logging.basicConfig(level=logging.INFO, stream=sys.stdout, format='%(message)s')\n"
        "import lightning\n"
        "from lightning.pytorch.utilities.rank_zero import rank_zero_info\n"
        "console.quiet_stops(resuming_in_place=False)\n"
        "rank_zero_info('\\nDetected KeyboardInterrupt, attempting graceful shutdown ...')\n"
        "rank_zero_info('a line that stays')\n"
        "logging.getLogger('lightning.pytorch.trainer.connectors.checkpoint_connector').info(\n"
        "    '`weights_only` was not set, defaulting to `False`.')\n"
    )
    proc = run_forked("-c", code, cwd=Path.cwd())
    assert_ok(proc)
    assert proc.stdout.split("\n") == ["a line that stays", ""]
