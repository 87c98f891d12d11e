"""The training system: DDP == one process, accumulation, seeds, optimizers, compile and sweeps,
as train.py runs them (a subprocess, or gpt.train.setup.build in this process). Kills, preemption and NaNs:
test_faults.py. The pieces on their own: tests/train/."""

from __future__ import annotations

import pytest
import torch

from gpt.config import OptimConfig
from gpt.runs.metrics import read_metrics
from gpt.train.optim import MuonWithAdamW, lr_factor
from tests.helpers import (
    BASE,
    DDP_COMMON,
    assert_ok,
    assert_same_weights,
    build_in_process,
    final_state,
    fit,
    losses,
    run_forked,
    train_cmd,
)


def test_ddp_two_processes_match_one_process(ddp_run, tiny_corpus, tmp_path):
    """The conftest's ddp_run (batches of 4 on each of two ranks) against one process (batches of 8)."""
    assert_ok(
        run_forked(*train_cmd(tiny_corpus, tmp_path / "one", *DDP_COMMON, "data.batch_size=8"), cwd=tmp_path)
    )
    (two,) = (ddp_run / "runs").glob("*/*")
    one, two_losses = losses(tmp_path / "one"), losses(two)
    assert len(one) == len(two_losses) == 10
    for step in one:
        assert abs(one[step] - two_losses[step]) < 1e-5, (step, one[step], two_losses[step])
    assert_same_weights(final_state(tmp_path / "one"), final_state(two), atol=1e-5)


def test_sweep_makes_one_run_per_value(tiny_corpus, tmp_path):
    proc = run_forked(
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
    assert_ok(proc)
    lrs = [
        torch.load(tmp_path / "sweep" / str(i) / "checkpoints" / "last.ckpt", weights_only=True)[
            "hyper_parameters"
        ]["optim"]["lr"]
        for i in (0, 1)
    ]
    assert lrs == [1e-3, 3e-3]


def test_a_sweep_on_two_devices_refuses_strategy_ddp_in_one_line(tiny_corpus, tmp_path):
    devices = ["trainer.accelerator=cpu", "trainer.devices=2", "trainer.max_steps=3", "trainer.strategy=ddp"]
    sweep = ["-m", "optim.lr=1e-3,3e-3", f"hydra.sweep.dir={tmp_path}/sweep"]
    refused = run_forked(*train_cmd(tiny_corpus, tmp_path / "x", *sweep, *devices), cwd=tmp_path)
    assert refused.returncode == 2 and "trainer.strategy=ddp_spawn" in refused.stderr.strip().splitlines()[-1]


@pytest.mark.slow  # 29 s: two jobs, each spawning two ranks
def test_sweep_on_two_devices_with_ddp_spawn(tiny_corpus, tmp_path):
    devices = ["trainer.accelerator=cpu", "trainer.devices=2", "trainer.max_steps=3"]
    sweep = ["-m", "optim.lr=1e-3,3e-3", f"hydra.sweep.dir={tmp_path}/sweep"]
    # strategy=auto (the default) spawns the ranks of each job
    assert_ok(
        run_forked(
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


# Inductor's compile (~30 s; the flag itself: test_compile_flag_compiles_the_model): the slow tier.
@pytest.mark.slow
def test_compile_runs_and_checkpoints_load_without_it(tiny_corpus, tmp_path):
    assert_ok(
        run_forked(
            # One block: Inductor's compile time grows with the graph, and one block says as much here.
            *train_cmd(
                tiny_corpus, tmp_path / "run", "compile=true", "trainer.max_steps=3", "model.n_layer=1"
            ),
            cwd=tmp_path,
        )
    )
    state = final_state(tmp_path / "run")
    assert not any("_orig_mod" in k for k in state)
    from gpt.runs.checkpoint import load_model

    model, _ = load_model(tmp_path / "run")  # read back without compiling
    assert model.num_params() > 0


@pytest.mark.slow  # 20 s: Tiny Shakespeare in r50k_base, a 50,257-token embedding
def test_doc_mask_trains_on_shakespeare_in_bpe_and_saves_a_checkpoint(tmp_path):
    """data.doc_mask=true end to end: train.py on data=shakespeare in r50k_base trains a few steps,
    validates and checkpoints. (Tiny Shakespeare is one document, split by characters: its parts
    follow each other without an end-of-text token, so each window is one document. Windows of
    several documents: tests/data/test_documents.py, tests/evaluate/test_bpb.py.)"""
    run_dir = tmp_path / "run"
    args = [
        "train.py",
        "experiment=tiny",
        "data=shakespeare",
        "data.tokenizer=r50k_base",
        "data.doc_mask=true",
        f"data.cache_dir={tmp_path / 'cache'}",
        "model.n_embd=32",
        "data.batch_size=4",
        "data.val_windows=4",
        "trainer.max_steps=3",
        "trainer.val_check_interval=3",
        "~callbacks.progress_bar",
        f"hydra.run.dir={run_dir}",
    ]
    assert_ok(run_forked(*args, cwd=tmp_path))
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["hyper_parameters"]["data"]["doc_mask"] is True and ckpt["global_step"] == 3
    val = [r["val/loss"] for r in read_metrics(run_dir) if "val/loss" in r]
    assert len(val) == 1 and 0 < val[0] < 12


# ----------------------------------------------------------------------------- in-process pieces


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


def test_lightnings_switch_turns_the_progress_bar_off(tiny_corpus, tmp_path):
    from lightning.pytorch.callbacks import ProgressBar

    with_bar = [a for a in BASE if a != "~callbacks.progress_bar"]
    trainer, _, _ = build_in_process(
        tiny_corpus, tmp_path / "a", "+trainer.enable_progress_bar=false", base=with_bar
    )
    assert not any(isinstance(c, ProgressBar) for c in trainer.callbacks)
    trainer, _, _ = build_in_process(tiny_corpus, tmp_path / "b", base=with_bar)
    assert any(isinstance(c, ProgressBar) for c in trainer.callbacks)
    # Without our bar, no bar: not Lightning's default one (rich's where rich is installed).
    trainer, _, _ = build_in_process(tiny_corpus, tmp_path / "c")
    assert "~callbacks.progress_bar" in BASE
    assert not any(isinstance(c, ProgressBar) for c in trainer.callbacks)
