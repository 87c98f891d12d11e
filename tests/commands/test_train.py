"""The training system: DDP == one process, accumulation, seeds, optimizers, schedules, compile
and sweeps. Kills, preemption and NaNs: test_faults.py."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch

from gpt.config import OptimConfig
from gpt.errors import ConfigError, UserError
from gpt.runs.metrics import read_metrics
from gpt.train.checks import accumulation_steps, check_devices
from gpt.train.loggers import run_label, wandb_fields
from gpt.train.optim import MuonWithAdamW, build_optimizer, lr_factor, muon_split
from gpt.train.resume import python_command, resolve_resume, resume_command
from tests.conftest import ROOT, run_script, tiny_model

BASE = [
    "data=text",
    "data.tokenizer=char",
    "model=nano",
    "model.block_size=32",
    "model.n_layer=2",
    "model.dropout=0.1",  # dropout draws from the global RNG: resume must restore it
    "data.val_windows=16",
    "optim.warmup_steps=2",
    "trainer.log_every_n_steps=1",
    "callbacks.samples.every_n_steps=0",
    "~callbacks.progress_bar",
    # fp32 on every machine: auto would pick bf16 on CPUs that compute it natively, and the
    # equivalence tests compare runs within fp32 tolerances.
    "trainer.precision=32-true",
]


def train_cmd(corpus: Path, run_dir: Path, *extra: str) -> list[str]:
    flags = [e for e in extra if e.startswith("-") and "=" not in e]  # -m goes before the overrides
    overrides = [e for e in extra if e not in flags]
    return ["train.py", *flags, *BASE, f"data.path={corpus}", f"hydra.run.dir={run_dir}", *overrides]


def ok(proc) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"


def final_state(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]


def losses(run_dir: Path) -> dict[int, float]:
    return {int(r["step"]): r["train/loss"] for r in read_metrics(run_dir) if "train/loss" in r}


def assert_same_weights(a: dict, b: dict, atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=k)


def test_ddp_two_processes_match_one_process(tiny_corpus, tmp_path):
    common = ["trainer.max_steps=10", "model.dropout=0.0", "trainer.accelerator=cpu"]
    ok(run_script(*train_cmd(tiny_corpus, tmp_path / "one", *common, "data.batch_size=8"), cwd=tmp_path))
    ok(
        run_script(
            *train_cmd(
                tiny_corpus,
                tmp_path / "two",
                *common,
                "data.batch_size=4",
                "trainer.devices=2",
                "trainer.strategy=ddp",
            ),
            cwd=tmp_path,
            timeout=600,
        )
    )
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(one) == len(two) == 10
    for step in one:
        assert abs(one[step] - two[step]) < 1e-5, (step, one[step], two[step])
    assert_same_weights(final_state(tmp_path / "one"), final_state(tmp_path / "two"), atol=1e-5)


def test_sweep_makes_one_run_per_value(tiny_corpus, tmp_path):
    proc = run_script(
        *train_cmd(
            tiny_corpus,
            tmp_path / "unused",
            "-m",
            "optim.lr=1e-3,3e-3",
            "trainer.max_steps=4",
            f"hydra.sweep.dir={tmp_path}/sweep",
        ),
        cwd=tmp_path,
    )
    ok(proc)
    lrs = [
        torch.load(tmp_path / "sweep" / str(i) / "checkpoints" / "last.ckpt", weights_only=True)[
            "hyper_parameters"
        ]["optim"]["lr"]
        for i in (0, 1)
    ]
    assert lrs == [1e-3, 3e-3]


def test_sweep_on_two_devices_with_ddp_spawn(tiny_corpus, tmp_path):
    devices = ["trainer.accelerator=cpu", "trainer.devices=2", "trainer.max_steps=3"]
    sweep = ["-m", "optim.lr=1e-3,3e-3", f"hydra.sweep.dir={tmp_path}/sweep"]
    refused = run_script(
        *train_cmd(tiny_corpus, tmp_path / "x", *sweep, *devices, "trainer.strategy=ddp"), cwd=tmp_path
    )
    assert refused.returncode == 2 and "trainer.strategy=ddp_spawn" in refused.stderr.strip().splitlines()[-1]
    # strategy=auto (the default) spawns the ranks of each job
    ok(
        run_script(
            *train_cmd(tiny_corpus, tmp_path / "x", *sweep, *devices),
            cwd=tmp_path,
            timeout=600,
        )
    )
    for i, lr in enumerate((1e-3, 3e-3)):
        ckpt = torch.load(tmp_path / "sweep" / str(i) / "checkpoints" / "last.ckpt", weights_only=True)
        assert ckpt["global_step"] == 3
        assert ckpt["optimizer_states"][0]["param_groups"][0]["initial_lr"] == lr
    assert sorted(p.name for p in (tmp_path / "sweep").iterdir()) == ["0", "1", "multirun.yaml"]


def test_compile_runs_and_checkpoints_load_without_it(tiny_corpus, tmp_path):
    ok(
        run_script(
            *train_cmd(tiny_corpus, tmp_path / "run", "compile=true", "trainer.max_steps=3"), cwd=tmp_path
        )
    )
    state = final_state(tmp_path / "run")
    assert not any("_orig_mod" in k for k in state)
    from gpt.runs.checkpoint import load_model

    model, _ = load_model(tmp_path / "run")  # read back without compiling
    assert model.num_params() > 0


# ----------------------------------------------------------------------------- in-process pieces


def build_in_process(corpus: Path, run_dir: Path, *overrides: str):
    """train.build in this process, as @hydra.main would call it: (trainer, module, datamodule)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    import train

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[*BASE, f"data.path={corpus}", *overrides], return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(run_dir)
        cfg.data.cache_dir = str(run_dir.parent / "cache")
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]  # as @hydra.main hands it to train.py
    return train.build(cfg)


def fit(corpus: Path, run_dir: Path, *overrides: str):
    """train.build + fit in this process (seconds, not a subprocess): returns the module."""
    trainer, module, datamodule = build_in_process(corpus, run_dir, *overrides)
    trainer.fit(module, datamodule=datamodule)
    return module


def test_accumulation_equals_one_big_batch(tiny_corpus, tmp_path):
    common = ["trainer.max_steps=5", "model.dropout=0.0"]
    big = fit(tiny_corpus, tmp_path / "big", *common, "data.batch_size=8")
    small = fit(
        tiny_corpus, tmp_path / "small", *common, "data.batch_size=2", "trainer.accumulate_grad_batches=4"
    )
    assert losses(tmp_path / "big").keys() == losses(tmp_path / "small").keys()
    for step, loss in losses(tmp_path / "big").items():
        assert abs(loss - losses(tmp_path / "small")[step]) < 1e-5
    # fp32 sums in another order; Adam's normalisation magnifies that where second moments are tiny
    assert_same_weights(big.model.state_dict(), small.model.state_dict(), atol=5e-5)


def test_muon_trains_hidden_matrices_and_adamw_the_rest(tiny_corpus, tmp_path):
    module = fit(tiny_corpus, tmp_path / "muon", "optim=muon", "optim.muon_lr=0.03", "trainer.max_steps=8")
    optimizer = module.optimizers().optimizer
    assert isinstance(optimizer, MuonWithAdamW)
    muon_ids = {id(p) for g in optimizer.muon.param_groups for p in g["params"]}
    assert id(module.model.h[0].attn.c_attn.weight) in muon_ids
    assert id(module.model.wte.weight) not in muon_ids
    rows = losses(tmp_path / "muon")
    assert rows[7] < rows[0]  # it learns
    # the scheduler drives both optimizers' groups
    assert optimizer.muon.param_groups[0]["lr"] == pytest.approx(
        0.03 * lr_factor(8, OptimConfig(**module.hparams["optim"]), 8)
    )


def test_muon_state_round_trip():
    model = tiny_model()
    opt = build_optimizer(model, OptimConfig(name="muon"))
    model(torch.randint(50, (2, 8))).sum().backward()
    opt.step()
    again = build_optimizer(model, OptimConfig(name="muon"))
    again.load_state_dict(opt.state_dict())
    hidden, rest = muon_split(model)
    assert len(hidden) == 4 * 2  # attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj in each of 2 blocks
    assert {id(p) for p in rest} == {
        id(p) for n, p in model.named_parameters() if not n.startswith("h.") or p.dim() < 2
    }
    p = hidden[0]
    torch.testing.assert_close(again.muon.state[p]["momentum_buffer"], opt.muon.state[p]["momentum_buffer"])


def test_wsd_schedule_values():
    cfg = OptimConfig(lr=1.0, warmup_steps=10, schedule="wsd", decay_fraction=0.2, min_lr_ratio=0.0)
    assert lr_factor(5, cfg, 100) == pytest.approx(0.6)
    assert lr_factor(50, cfg, 100) == 1.0 and lr_factor(79, cfg, 100) == 1.0
    assert lr_factor(90, cfg, 100) == pytest.approx(0.5)
    assert lr_factor(100, cfg, 100) == pytest.approx(0.0)


def test_resolve_resume(tmp_path, monkeypatch):
    assert resolve_resume(None, tmp_path) is None
    with pytest.raises(UserError, match="ckpt_path=last but"):
        resolve_resume("last", tmp_path)
    with pytest.raises(UserError, match="does not exist"):
        resolve_resume(str(tmp_path / "nope.ckpt"), tmp_path)
    (tmp_path / "checkpoints").mkdir()
    torch.save({"global_step": 10}, tmp_path / "checkpoints" / "step-10.ckpt")
    time.sleep(0.01)
    torch.save({"global_step": 20}, tmp_path / "checkpoints" / "last.ckpt")
    assert resolve_resume(None, tmp_path).endswith("last.ckpt")
    assert resolve_resume("last", tmp_path).endswith("last.ckpt")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve_resume("~/checkpoints/step-10.ckpt", "elsewhere") == str(
        tmp_path / "checkpoints" / "step-10.ckpt"
    )
    # a newer but truncated file (a kill mid-write outside Lightning's atomic save) is skipped
    good = (tmp_path / "checkpoints" / "last.ckpt").read_bytes()
    time.sleep(0.01)
    (tmp_path / "checkpoints" / "step-30.ckpt").write_bytes(good[: len(good) // 2])
    with pytest.warns(UserWarning, match="skipping unreadable checkpoint .*step-30.ckpt"):
        assert resolve_resume(None, tmp_path).endswith("last.ckpt")
    # a checkpoint carrying a pickled object is refused
    time.sleep(0.01)
    torch.save({"payload": Path("x")}, tmp_path / "checkpoints" / "evil.ckpt")
    with pytest.raises(UserError, match="evil.ckpt is not a checkpoint \\(it holds Python objects"):
        resolve_resume(str(tmp_path / "checkpoints" / "evil.ckpt"), tmp_path)


def test_more_devices_than_the_machine_has_are_refused(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})  # two CPU cores
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for accelerator, devices in (("cpu", 2), ("auto", 1), ("auto", "auto"), ("cpu", -1)):
        check_devices(accelerator, devices)
    with pytest.raises(ConfigError, match="trainer.devices=3 on CPU but this process may use 2 CPU core"):
        check_devices("auto", 3)
    with pytest.raises(ConfigError, match="trainer.accelerator=gpu but torch finds no CUDA GPU"):
        check_devices("gpu", 1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # as on a machine with four GPUs
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    for accelerator, devices in (("gpu", 4), ("auto", 4), ("cpu", 2), ("gpu", [0, 3])):
        check_devices(accelerator, devices)
    with pytest.raises(ConfigError, match=r"trainer.devices=8 but this machine has 4 CUDA GPU\(s\)"):
        check_devices("auto", 8)


def test_resume_command_names_the_run_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    py = python_command()
    typed = ["train.py", "model=small", 'prompt="a b"']
    assert (
        resume_command(typed, tmp_path / "runs/d/t")
        == f"""{py} train.py model=small 'prompt="a b"' hydra.run.dir=runs/d/t"""
    )
    given = ["train.py", "hydra.run.dir=runs/mine"]
    assert resume_command(given, tmp_path / "runs/mine") == f"{py} train.py hydra.run.dir=runs/mine"
    assert resume_command(["train.py"], "/else where") == f"""{py} train.py 'hydra.run.dir="/else where"'"""
    # one job of a sweep: that job's overrides, without -m
    sweep = ["train.py", "-m", "optim.lr=1e-3,3e-3"]
    assert resume_command(sweep, tmp_path / "runs/multirun/d/t/1", ["optim.lr=3e-3"]) == (
        f"{py} train.py optim.lr=3e-3 hydra.run.dir=runs/multirun/d/t/1"
    )


def test_accumulation_steps_and_wandb_fields():
    assert accumulation_steps(8192, 4, 256, 2) == 4
    with pytest.raises(ConfigError, match="= 2048; pick a multiple"):
        accumulation_steps(3000, 4, 256, 2)
    fields = wandb_fields(["model=small", "optim.lr=3e-4", "seed=2", "hydra.run.dir=x"], "/tmp/run")
    assert fields["name"] == "model=small,optim.lr=3e-4,seed=2"
    assert fields["group"] == "model=small,optim.lr=3e-4"
    assert fields["tags"] == ["model=small", "optim.lr=3e-4", "seed=2"]
    assert fields["id"] == wandb_fields([], "/tmp/run")["id"] != wandb_fields([], "/tmp/other")["id"]
    assert run_label([]) == "defaults"


def test_same_seed_same_run_other_seed_other_run(tiny_corpus, tmp_path):
    runs = {
        name: fit(tiny_corpus, tmp_path / name, "trainer.max_steps=5", *extra)
        for name, extra in (("a", []), ("b", []), ("c", ["seed=7"]))
    }
    assert losses(tmp_path / "a") == losses(tmp_path / "b") != losses(tmp_path / "c")
    assert_same_weights(runs["a"].model.state_dict(), runs["b"].model.state_dict())


def test_tokens_per_step_sets_accumulation(tiny_corpus, tmp_path):
    # 256 tokens per step = 2 micro-batches of 4 x 32 tokens
    module = fit(
        tiny_corpus, tmp_path / "run", "tokens_per_step=256", "data.batch_size=4", "trainer.max_steps=3"
    )
    assert module.trainer.accumulate_grad_batches == 2
    rows = [r for r in read_metrics(tmp_path / "run") if "train/tokens" in r]
    assert [r["train/tokens"] for r in rows] == [256.0, 512.0, 768.0]


def test_samples_are_written_and_leave_training_unchanged(tiny_corpus, tmp_path):
    fit(tiny_corpus, tmp_path / "plain", "trainer.max_steps=4")
    fit(
        tiny_corpus,
        tmp_path / "sampled",
        "trainer.max_steps=4",
        "callbacks.samples.every_n_steps=2",
        "callbacks.samples.max_new_tokens=20",
    )
    text = (tmp_path / "sampled" / "samples.txt").read_text()
    assert text.count("=== step 2\n") == 1 and text.count("=== step 4\n") == 1
    assert losses(tmp_path / "sampled") == losses(tmp_path / "plain")  # dropout's RNG stream untouched


def test_throughput_logs_tokens_per_second_and_mfu_from_peak_flops(tiny_corpus, tmp_path):
    module = fit(
        tiny_corpus,
        tmp_path / "run",
        "trainer.max_steps=6",
        "callbacks.throughput.window_size=2",
        "callbacks.throughput.peak_flops=1e12",
    )
    rows = [r for r in read_metrics(tmp_path / "run") if "train/device/mfu" in r]
    assert rows, "no MFU logged"
    last = rows[-1]
    # MFU = model FLOP/s / peak, and FLOP/s = flops_per_batch x batches/s
    assert last["train/device/mfu"] == pytest.approx(last["train/device/flops_per_sec"] / 1e12)
    module.train()
    assert last["train/device/flops_per_sec"] == pytest.approx(
        module.flops_per_batch * last["train/device/batches_per_sec"], rel=1e-6
    )
    assert last["train/device/items_per_sec"] == pytest.approx(last["train/device/batches_per_sec"] * 16 * 32)


def test_compile_flag_compiles_the_model(tiny_corpus, tmp_path):
    _, compiled, _ = build_in_process(tiny_corpus, tmp_path / "a", "compile=true")
    _, eager, _ = build_in_process(tiny_corpus, tmp_path / "b")
    assert compiled.model._compiled_call_impl is not None
    assert eager.model._compiled_call_impl is None


def test_val_windows_null_scores_fewer_windows_on_cpu_with_a_large_vocabulary(tiny_corpus, tmp_path):
    """train.py hands the data module what data.val_windows=null resolves to, not None or 512."""
    bpe = "data.tokenizer=r50k_base"
    _, _, large = build_in_process(tiny_corpus, tmp_path / "bpe", bpe, "data.val_windows=null")
    _, _, chars = build_in_process(tiny_corpus, tmp_path / "char", "data.val_windows=null")
    _, _, chosen = build_in_process(tiny_corpus, tmp_path / "set", bpe, "data.val_windows=100")
    assert (large.cfg.val_windows, chars.cfg.val_windows, chosen.cfg.val_windows) == (64, 512, 100)
