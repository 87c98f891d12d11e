"""bench/bench_serve.py runs end to end, small: its JSON holds every run and the transformers loop."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers import ROOT


@pytest.mark.slow  # about 40 s: a server, two client counts, transformers, two rounds
def test_bench_serve_writes_its_json(tmp_path):
    out = tmp_path / "serve.json"
    args = ["clients=[1,3]", "requests_per_client=1", "max_tokens=8", "rounds=2", f"out={out}"]
    args.append(f"ckpt_dir={tmp_path}")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bench_serve.py"), *args],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert [(r["clients"], r["tokens"]) for r in result["serve"]] == [(1, 8), (3, 24)]
    assert result["transformers_loop"]["tokens"] == 8
    assert result["one_client_over_transformers"] > 0 and "3 clients / 1 client" in proc.stdout
    # Two rounds, each with every client count and the loop; the ratios are the rounds' own, medians.
    assert [sorted(r["clients"]) for r in result["rounds"]] == [["1", "3"], ["1", "3"]]
    assert all(r["transformers_loop"]["tokens"] == 8 for r in result["rounds"])
    by_round = [
        r["clients"]["3"]["tokens_per_s"] / r["clients"]["1"]["tokens_per_s"] for r in result["rounds"]
    ]
    assert result["scaling_over_one_client_by_round"]["3"] == [round(x, 2) for x in by_round]
    assert result["scaling_over_one_client"]["3"] == round((by_round[0] + by_round[1]) / 2, 2)
    assert "Unfeasible" not in proc.stderr
