"""bench/device.sh --dry-run: the GPU script's every stage on a CPU with tiny shapes, and its JSON."""

import json
import os
import subprocess

import pytest

from tests.helpers import ROOT

STAGES = {"matmul", "train", "shakespeare", "generate", "pytest_gpu"}


# Slow: five stages, each a process of its own that imports torch and Lightning afresh, a training
# to the Shakespeare target and a compiled decode (50 s on 2 cores). CI runs it in the slow tier.
@pytest.mark.slow
def test_device_script_dry_run_writes_every_stage(tmp_path):
    proc = subprocess.run(
        ["bash", "bench/device.sh", "--dry-run"],
        cwd=ROOT,
        env=os.environ | {"OUT": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "device.json").read_text())
    assert result.keys() == {"date", "dry_run", "machine", "peak_flops", "total_seconds", "stages"}
    assert result["dry_run"] is True and result["stages"].keys() == STAGES
    failed = {k: v["error"] for k, v in result["stages"].items() if not v["ok"]}
    assert not failed, f"{failed}\n{(tmp_path / 'device.log').read_text()[-4000:]}"
    stages = result["stages"]
    assert stages["matmul"]["tflops_per_s"] > 0
    assert stages["train"]["tokens_per_s"] > 0 and "mfu_vs_matmul_pct" in stages["train"]
    assert stages["shakespeare"]["val_loss"] <= stages["shakespeare"]["target"]
    assert {(r["compile"], r["batch"]) for r in stages["generate"]["rows"]} == {
        (c, b) for c in (False, True) for b in (1, 32)
    }
    assert stages["pytest_gpu"]["tests"] >= 1  # on a CPU every one is skipped
    assert "train" in (tmp_path / "device.txt").read_text()
