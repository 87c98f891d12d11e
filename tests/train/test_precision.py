"""trainer.precision=auto and the bf16 speed it is decided by, with the hardware query mocked both
ways, and once for real with oneDNN held to AVX2 (where bf16 is emulated on any x86 CPU)."""

from __future__ import annotations

import platform

import pytest
import torch

from gpt.train import precision
from gpt.train.precision import bf16_speed, resolve_precision
from tests.helpers import run_script


@pytest.fixture
def cpu_ratio(monkeypatch):
    """Set what the CPU probe measures: bf16 matmul time / fp32 matmul time."""

    def set_ratio(ratio: float) -> None:
        monkeypatch.setattr(precision, "cpu_bf16_ratio", lambda: ratio)
        bf16_speed.cache_clear()

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    yield set_ratio
    bf16_speed.cache_clear()


def test_auto_is_bf16_on_a_cpu_with_native_bf16(cpu_ratio):
    cpu_ratio(0.3)
    chosen, line, warning = resolve_precision("auto", "auto", 384)
    assert chosen == "bf16-mixed" and warning is None
    assert line.startswith("precision: bf16-mixed (trainer.precision=auto: bf16 is native on this CPU")


def test_auto_is_fp32_for_a_narrow_model_even_with_native_bf16(cpu_ratio):
    cpu_ratio(0.3)
    chosen, line, _ = resolve_precision("auto", "cpu", 128)
    assert chosen == "32-true" and line.endswith("but at 128 wide fp32 is faster)")
    assert resolve_precision("auto", "cpu", 256)[0] == "bf16-mixed"


def test_auto_is_fp32_on_a_cpu_that_emulates_bf16(cpu_ratio):
    cpu_ratio(48.0)
    chosen, line, warning = resolve_precision("auto", "cpu", 384)
    assert chosen == "32-true" and warning is None
    assert "emulates bf16: a bf16 matmul took 48x as long as fp32" in line


@pytest.mark.parametrize("requested", ["bf16-mixed", "bf16-true", "16-mixed"])
def test_explicit_bf16_on_an_emulating_cpu_is_kept_with_a_warning(cpu_ratio, requested):
    cpu_ratio(48.0)
    chosen, _, warning = resolve_precision(requested, "cpu", 384)
    assert chosen == ("bf16-mixed" if requested == "16-mixed" else requested)
    assert warning.startswith(f"trainer.precision={requested} on a CPU that emulates bf16")
    assert "48x as long as fp32" in warning


def test_explicit_precisions_on_a_fast_cpu_are_left_alone(cpu_ratio):
    cpu_ratio(0.3)
    assert resolve_precision("bf16-mixed", "cpu", 384) == ("bf16-mixed", None, None)
    assert resolve_precision("32-true", "cpu", 384) == ("32-true", None, None)
    chosen, note, warning = resolve_precision("16-mixed", "cpu", 384)
    assert (chosen, warning) == ("bf16-mixed", None) and "runs as bf16-mixed" in note


@pytest.mark.parametrize(("native", "expected"), [(True, "bf16-mixed"), (False, "32-true")])
def test_auto_on_a_gpu_follows_native_bf16(monkeypatch, native, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H200" if native else "Tesla V100")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: native)
    monkeypatch.setattr(precision, "cpu_bf16_ratio", lambda: pytest.fail("a GPU run must not probe the CPU"))
    bf16_speed.cache_clear()
    try:
        chosen, line, _ = resolve_precision("auto", "auto", 384)
    finally:
        bf16_speed.cache_clear()
    assert chosen == expected
    assert ("H200 computes bf16 natively" if native else "V100 has no native bf16") in line


def test_the_probe_measures_a_positive_ratio():
    ratio = precision.cpu_bf16_ratio.__wrapped__(64)
    assert 0 < ratio < 10_000


# A real train.py under emulated AVX2 (the probe's decision has unit tests above): the slow tier.
@pytest.mark.slow
def test_train_with_onednn_held_to_avx2_chooses_fp32(tiny_corpus, tmp_path):
    """The real probe, end to end: oneDNN limited to AVX2 emulates bf16 on any x86 CPU."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("ONEDNN_MAX_CPU_ISA=AVX2 only means something on x86")
    proc = run_script(
        "train.py",
        "experiment=tiny",
        "data=text",
        f"data.path={tiny_corpus}",
        "model.n_layer=1",
        "data.val_windows=4",
        "trainer.max_steps=2",
        "trainer.precision=auto",  # what this test is about (tiny sets 32-true)
        f"hydra.run.dir={tmp_path}/run",
        cwd=tmp_path,
        env={"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert "precision: 32-true (trainer.precision=auto: this CPU (AVX2) emulates bf16" in out
