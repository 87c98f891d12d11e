"""bench/bench_serve.py runs end to end, small: its JSON holds every run and the transformers loop."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers import ROOT


@pytest.mark.slow  # about 40 s: a server, two client counts, transformers
def test_bench_serve_writes_its_json(tmp_path):
    out = tmp_path / "serve.json"
    args = ["clients=[1,3]", "requests_per_client=1", "max_tokens=8", f"out={out}", f"ckpt_dir={tmp_path}"]
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
    assert "Unfeasible" not in proc.stderr
