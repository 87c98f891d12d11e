"""A run's CSV logs read back as one table: segments of resumed runs stitched in step order."""

from __future__ import annotations

from pathlib import Path

from gpt.runs.metrics import read_metrics


def write_version(run: Path, n: int, text: str) -> None:
    (run / "csv" / f"version_{n}").mkdir(parents=True)
    (run / "csv" / f"version_{n}" / "metrics.csv").write_text(text)


def test_rows_are_floats_without_empty_cells(tmp_path):
    write_version(tmp_path, 0, "step,train/loss,val/loss\n0,4.5,\n1,4.25,4.0\n")
    assert read_metrics(tmp_path) == [
        {"step": 0.0, "train/loss": 4.5},
        {"step": 1.0, "train/loss": 4.25, "val/loss": 4.0},
    ]


def test_a_resumed_segment_replaces_the_steps_it_repeats(tmp_path):
    # Killed after logging step 5; resumed from the checkpoint of step 3, which repeats 4 and 5.
    write_version(tmp_path, 0, "step,train/loss\n" + "".join(f"{s},{10 + s}\n" for s in range(6)))
    write_version(tmp_path, 1, "step,train/loss\n" + "".join(f"{s},{20 + s}\n" for s in range(4, 8)))
    assert [(r["step"], r["train/loss"]) for r in read_metrics(tmp_path)] == [
        (0, 10), (1, 11), (2, 12), (3, 13), (4, 24), (5, 25), (6, 26), (7, 27)
    ]  # fmt: skip


def test_segments_are_ordered_by_version_number_not_name(tmp_path):
    for n in range(11):  # version_10 sorts before version_2 by name
        write_version(tmp_path, n, f"step,train/loss\n{n},{n}\n")
    assert [r["step"] for r in read_metrics(tmp_path)] == list(range(11))


def test_empty_segments_and_runs_without_logs(tmp_path):
    assert read_metrics(tmp_path) == []
    write_version(tmp_path, 0, "step,train/loss\n0,1.0\n")
    write_version(tmp_path, 1, "step,train/loss\n")  # a start that failed before logging
    assert read_metrics(tmp_path) == [{"step": 0.0, "train/loss": 1.0}]
