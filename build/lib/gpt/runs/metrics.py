"""A run's logged metrics, read back from its CSV logs (one table over every resumed version)."""

from __future__ import annotations

import csv
from pathlib import Path


def read_metrics(run_dir: str | Path) -> list[dict[str, float]]:
    """The run's CSV log as one list of rows in step order, its segments stitched together.

    Each start or resume writes csv/version_N/metrics.csv. A resume repeats the steps after its
    checkpoint, so each segment supersedes the earlier segments' rows from its first step on.
    """
    segments = sorted(
        Path(run_dir, "csv").glob("version_*/metrics.csv"), key=lambda p: int(p.parent.name[8:])
    )
    rows: list[dict[str, float]] = []
    for path in segments:
        with open(path, newline="") as f:
            new = [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]
        if new:
            first = min(r["step"] for r in new)
            rows = [r for r in rows if r["step"] < first] + new
    return rows
