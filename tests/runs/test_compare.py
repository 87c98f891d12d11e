"""compare.py on three real short runs (one Hydra sweep), checked against the runs' own logs."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from gpt.config import CompareConfig
from gpt.runs.checkpoint import load_model
from gpt.runs.compare import Run, compare_runs, read_evals, table, tokens_axis, wall_seconds
from gpt.runs.metrics import read_metrics
from tests.helpers import assert_one_line_exit, command, run_forked, write_corpus

# Its tests share costly module fixtures: one xdist worker runs them all, the fixtures once.
pytestmark = pytest.mark.xdist_group(__name__)

main = command("compare", CompareConfig, compare_runs)

SWEEP = [
    "-m",
    "model.n_layer=1,2,3",  # three runs whose configs differ in one value
    "experiment=tiny",
    "data=text",
    "data.val_windows=8",
    "trainer.max_steps=6",
    "trainer.val_check_interval=3",
    "optim.warmup_steps=1",
    "~callbacks.progress_bar",
]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("compare")
    write_corpus(work / "corpus.txt")
    proc = run_forked(
        "train.py", *SWEEP, f"data.path={work / 'corpus.txt'}", f"hydra.sweep.dir={work / 'sweep'}", cwd=work
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return work / "sweep"


def parse_table(out: str) -> list[dict[str, str]]:
    lines = out.strip().splitlines()
    header = re.split(r"\s{2,}", lines[0])
    return [dict(zip(header, re.split(r"\s{2,}", line), strict=True)) for line in lines[2:]]


def count(text: str) -> float:
    """The table's 1.23k / 4.56M back into a number."""
    scale = {"k": 1e3, "M": 1e6, "B": 1e9}.get(text[-1], 1)
    return float(text.rstrip("kMB")) * scale


def test_compare_table_matches_the_runs_logs(sweep, tmp_path, capsys):
    main([f"runs={sweep}/*", f"out={tmp_path}/plot.png"])  # one glob string, expanded by compare
    rows = parse_table(capsys.readouterr().out)
    assert [r["run"] for r in rows] == ["0", "1", "2"]
    assert list(rows[0])[:2] == ["run", "model.n_layer"]  # the one config value that differs
    for row, n_layer in zip(rows, (1, 2, 3), strict=True):
        run = sweep / row["run"]
        logs = read_metrics(run)
        train = [r for r in logs if "train/loss" in r]
        val = [r["val/loss"] for r in logs if "val/loss" in r]
        model, _ = load_model(run)
        assert row["model.n_layer"] == str(n_layer) == str(model.config.n_layer)
        assert row["params"] == f"{model.num_params() / 1e3:.2f}k"
        assert row["steps"] == str(len(train)) == "6"
        assert row["tokens"] == f"{train[-1]['train/tokens'] / 1e3:.2f}k" == f"{6 * 8 * 32 / 1e3:.2f}k"
        assert row["best val loss"] == f"{min(val):.4f}" and len(val) == 2
        assert row["val ppl"] == f"{math.exp(min(val)):.2f}"
        seconds = max(r["train/time"] for r in logs if "train/time" in r)
        h, rest = divmod(round(seconds), 3600)
        assert row["train time"] == f"{h}:{rest // 60:02d}:{rest % 60:02d}"
        assert count(row["tokens/s"]) == pytest.approx(train[-1]["train/tokens"] / seconds, rel=0.01)
    png = (tmp_path / "plot.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 20_000


def test_compare_takes_a_folder_of_runs_and_writes_the_plot(sweep, tmp_path, capsys):
    main([f"runs=[{sweep}]", f"out={tmp_path}/sub/p.png"])
    assert len(parse_table(capsys.readouterr().out)) == 3
    assert (tmp_path / "sub" / "p.png").is_file()


@pytest.mark.parametrize(
    "args, message",
    [
        (["runs=[missing-run]"], "missing-run does not exist"),
        (["runs=nothing-*"], "nothing-* matches no run dir"),
        ([], "say which runs to compare: python compare.py runs=[DIR,...]"),
        (["runs=[]"], "say which runs to compare: python compare.py runs=[DIR,...]"),
        (["runs="], "say which runs to compare: python compare.py runs=[DIR,...]"),
        (["runs=null"], "say which runs to compare: python compare.py runs=[DIR,...]"),
        (["runs=[.]"], ". holds no run"),
        (["runs=[a]", "outt=p.png"], "Key 'outt' not in 'CompareConfig'"),
        (["runs=[a]", "out="], "out= is empty; name the plot file, such as out=compare.png"),
        (["runs=[[a]]"], "runs=[['a']]: give run dirs or globs as a list"),
    ],
)
def test_bad_input_is_one_line(tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    assert_one_line_exit(main, args, message, capsys)


def test_wall_time_adds_up_resumed_segments():
    rows = [{"train/time": t} for t in (1.0, 2.0, 5.0, 0.5, 3.0)]  # a resume restarts the clock
    assert wall_seconds(rows) == 8.0
    assert wall_seconds([{"step": 1.0}]) is None


def test_validation_points_are_placed_at_the_tokens_seen_by_their_step():
    rows = [
        {"step": 1.0, "train/loss": 3.0, "train/tokens": 512.0},
        {"step": 3.0, "train/loss": 2.5, "train/tokens": 1024.0},
        {"step": 3.0, "val/loss": 2.7},
    ]
    assert tokens_axis(rows, "train/loss") == ([512.0, 1024.0], [3.0, 2.5])
    assert tokens_axis(rows, "val/loss") == ([1024.0], [2.7])
    assert tokens_axis([], "val/loss") == ([], [])


@pytest.mark.parametrize(
    "file, content, message",
    [
        (".hydra/config.yaml", "model: [unclosed\n", "config.yaml is not readable YAML"),
        (".hydra/config.yaml", "- a list\n", "config.yaml holds a list, not a config"),
        ("csv/version_0/metrics.csv", "step,train/loss\n0,nan?\n", "csv/ is not readable (ValueError"),
        ("checkpoints/last.ckpt", "half a checkpoint", "last.ckpt is not a checkpoint (not the zip archive"),
    ],
)
def test_broken_run_files_are_one_line(tmp_path, capsys, file, content, message):
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text("seed: 1\n")
    (run / "csv" / "version_0").mkdir(parents=True)
    (run / "csv" / "version_0" / "metrics.csv").write_text("step,train/loss\n0,4.2\n")
    (run / file).parent.mkdir(parents=True, exist_ok=True)
    (run / file).write_text(content)
    assert_one_line_exit(main, [f"runs=[{run}]", f"out={tmp_path}/plot.png"], message, capsys)
    assert not (tmp_path / "plot.png").exists()


@pytest.mark.parametrize(
    "out, message",
    [
        ("plot.txt", "out=plot.txt: cannot write a .txt plot; name a .png, .pdf or .svg file"),
        ("notes/plot.png", "out=notes/plot.png: notes is a file, not a folder"),
        ("plots", "out=plots is a folder; name a file such as plots/compare.png"),
    ],
)
def test_plot_path_is_checked_before_the_runs_are_read(tmp_path, monkeypatch, capsys, out, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes").write_text("a file")
    (tmp_path / "plots").mkdir()
    assert_one_line_exit(main, ["runs=[missing-run]", f"out={out}"], message, capsys)


def test_runs_are_a_list_or_one_glob_string_with_home_expanded(monkeypatch):
    monkeypatch.setenv("HOME", "/home/me")
    assert CompareConfig(runs="~/runs/*", out="~/p.png") == CompareConfig(
        ["/home/me/runs/*"], "/home/me/p.png"
    )
    assert CompareConfig(runs=["a", 0, 1]).runs == ["a", "0", "1"]  # a sweep's run dirs are numbers


def test_evaluation_results_become_columns_and_other_files_are_passed_over(tmp_path, capsys):
    evals = tmp_path / "evals"
    evals.mkdir()
    (evals / "hellaswag.json").write_text(
        json.dumps({"task": "hellaswag", "metrics": {"acc": 26.5, "acc_norm": 27.25}})
    )
    (evals / "bpb.json").write_text(json.dumps({"task": "bpb", "metrics": {"bpb": 2.34567, "loss": 1.5}}))
    # 0.3.0's generation summary (no "task", metrics by method) and outputs, and a broken file
    (evals / "test-last.metrics.json").write_text(json.dumps({"metrics": {"greedy": {"exact_match": 1.0}}}))
    (evals / "hellaswag.jsonl").write_text("{}\n")
    (evals / "broken.json").write_text("{oops")
    assert read_evals(tmp_path) == {
        "bpb/bpb": 2.34567,
        "bpb/loss": 1.5,
        "hellaswag/acc": 26.5,
        "hellaswag/acc_norm": 27.25,
    }
    assert "broken.json is not readable JSON" in capsys.readouterr().err
    run = Run(path=tmp_path, config={}, rows=[], evals=read_evals(tmp_path), label="a")
    other = Run(path=tmp_path, config={}, rows=[], evals={"hellaswag/acc": 30.0}, label="b")
    header, *rows = table([run, other])
    assert header[-4:] == ["bpb/bpb", "bpb/loss", "hellaswag/acc", "hellaswag/acc_norm"]
    assert rows[0][-4:] == ["2.3457", "1.5000", "26.50", "27.25"]
    assert rows[1][-4:] == ["-", "-", "30.00", "-"]
