"""The benchmarks' configs (conf/bench_*.yaml), and the models bench_train.py times: the presets of
conf/model/, as train.py composes them. Nothing is timed here."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from gpt.config import ModelConfig
from gpt.errors import ConfigError
from tests.helpers import ROOT

CONF = ROOT / "conf"
BENCH_KEYS = {
    "train": {"presets", "cpu_presets", "gpu_presets", "vocab_sizes", "batch_sizes", "batch_size", "steps"}
    | {"warmup", "rounds", "precision", "compile", "peak_flops", "out"},
    "generate": {"out", "ckpt_dir", "new_tokens", "repeats", "compile", "threads"},
    "prepare": {"mb", "workers", "verify", "seed", "out"},
    "tokenizer": {"mb", "vocab_size", "pattern", "repeats", "holdout", "out"},
    "serve": {"out", "ckpt_dir", "clients", "requests_per_client", "max_tokens", "transformers", "rounds"},
    "run": {"only"},
    "ablate": {
        "corpora",
        "options",
        "combine",
        "seeds",
        "eval_every",
        "jobs",
        "torch_threads",
        "timing_steps",
    }
    | {"timing_rounds", "timing_only", "work_dir", "out"},
    "recipe": {"nanogpt_dir", "nanogpt_commit", "nanogpt_args", "ours", "rounds", "cpu_kind", "python"}
    | {"max_ratio", "max_val_loss", "work_dir", "out"},
}


def load_bench(name: str):
    """bench/<name>.py as a module (its folder on sys.path, as when it runs)."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(ROOT / "bench"))


@pytest.fixture(scope="module")
def bench_train():
    yield from load_bench("bench_train")


@pytest.fixture(scope="module")
def bench_ablate():
    yield from load_bench("bench_ablate")


@pytest.fixture(scope="module")
def bench_recipe():
    yield from load_bench("bench_recipe")


def compose_bench(name: str, *overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(f"bench_{name}", overrides=list(overrides), return_hydra_config=True)


@pytest.mark.parametrize("name", sorted(BENCH_KEYS))
def test_bench_configs_compose_with_their_keys_at_the_top(name):
    cfg = compose_bench(name)
    assert set(cfg) - {"hydra"} == BENCH_KEYS[name]
    assert cfg.hydra.output_subdir is None and cfg.hydra.run.dir == "."  # no run folder


@pytest.mark.parametrize("name", sorted(BENCH_KEYS))
def test_every_bench_knob_has_a_comment(name):
    lines = (CONF / f"bench_{name}.yaml").read_text().splitlines()
    for i, line in enumerate(lines):
        if line.split(":")[0] in BENCH_KEYS[name]:
            assert lines[i - 1].startswith("#"), f"{name}.yaml: no comment above {line!r}"


def test_bench_train_times_the_presets_of_conf_model(bench_train):
    assert not hasattr(bench_train, "PRESETS")  # restated shapes are gone
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("bench_train")
        assert bench_train.presets(cfg, cuda=False) == ["nano", "small"]
        assert bench_train.presets(cfg, cuda=True) == ["nano", "small", "medium", "large"]
        for name in ("nano", "small", "medium", "large", "gpt2"):
            preset = yaml.safe_load((CONF / "model" / f"{name}.yaml").read_text())
            preset.pop("defaults")
            model, _ = bench_train.timed_model(name, cfg)
            assert isinstance(model, ModelConfig)
            assert {k: getattr(model, k) for k in preset} == preset
        # The models, vocabularies and batches timed before the presets were read from conf/model/.
        before = {
            "nano": (dict(n_layer=4, n_head=4, n_embd=128, block_size=64), 65, 16),
            "small": (dict(n_layer=6, n_head=6, n_embd=384, block_size=256), 65, 16),
            "medium": (dict(n_layer=12, n_head=12, n_embd=768, block_size=1024), 50257, 8),
            "large": (dict(n_layer=24, n_head=16, n_embd=1024, block_size=1024), 50257, 4),
        }
        for name, (shape, vocab, batch_size) in before.items():
            assert bench_train.timed_model(name, cfg) == (ModelConfig(**shape, vocab_size=vocab), batch_size)
        assert bench_train.timed_model("nano", compose("bench_train", ["batch_size=3"]))[1] == 3
        assert bench_train.presets(compose("bench_train", ["presets=[gpt2,large]"]), cuda=False) == [
            "gpt2",
            "large",
        ]
        with pytest.raises(ConfigError, match="there is no model=tiny; choose presets from gpt2, .*nano"):
            bench_train.presets(compose("bench_train", ["presets=[nano,tiny]"]), cuda=False)


def test_bench_train_reads_every_preset_name_from_conf_model(bench_train):
    names = sorted(p.stem for p in (CONF / "model").glob("*.yaml"))
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("bench_train", [f"presets=[{','.join(names)}]"])
        assert bench_train.presets(cfg, cuda=False) == names
        assert OmegaConf.to_container(cfg.presets) == names


# Lines in the formats nanoGPT's train.py and ours print at the end of a run (values made up).
NANOGPT_OUTPUT = """\
step 1750: train loss 1.7453, val loss 1.8947
saving checkpoint to out-shakespeare-char
iter 1900: loss 1.7716, time 46.10ms, mfu 0.01%
step 2000: train loss 1.7355, val loss 1.8861
saving checkpoint to out-shakespeare-char
iter 2000: loss 1.7006, time 2011.55ms, mfu 0.01%
"""
OURS_OUTPUT = """\
validation at step 380: val/loss 1.8790, val/ppl 6.5470, val/bpb 2.7108
training finished at step 380: 380 steps in 41.2 s (training and validation), 389,120 training tokens
  final val/loss 1.8790 at step 380, best 1.8790 at step 380
  last checkpoint: runs/x/checkpoints/last.ckpt
"""


def test_bench_recipe_reads_each_recipes_final_val_loss(bench_recipe):
    assert bench_recipe.nanogpt_val_loss(NANOGPT_OUTPUT) == 1.8861
    assert bench_recipe.ours_val_loss(OURS_OUTPUT) == 1.8790
    # No summary (a run stopped after its validation): the last validation line.
    assert bench_recipe.ours_val_loss(OURS_OUTPUT.split("training finished")[0]) == 1.8790
    assert bench_recipe.nanogpt_val_loss("iter 0: loss 4.2\n") is None
    assert bench_recipe.ours_val_loss("run dir: runs/x\n") is None


def test_bench_recipe_without_nanogpt_says_how_to_get_it_in_one_line(bench_recipe, tmp_path, capsys):
    commit = compose_bench("recipe").nanogpt_commit
    for where in (str(tmp_path / "nowhere"), str(tmp_path)):  # missing, and without nanoGPT's files
        cfg = compose_bench("recipe", f"nanogpt_dir={where}")
        with pytest.raises(SystemExit) as exited:
            bench_recipe.main.__wrapped__(cfg)
        assert exited.value.code != 0
        err = capsys.readouterr().err.strip()
        assert "\n" not in err
        assert f"git clone https://github.com/karpathy/nanoGPT {where}" in err and commit in err
    for name in bench_recipe.NANOGPT_FILES:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("")
    assert bench_recipe.missing_nanogpt(str(tmp_path), commit) is None
    assert "nanogpt_dir is not set" in bench_recipe.missing_nanogpt(None, commit)


def test_bench_recipe_cpu_kind_sets_the_same_env_for_both(bench_recipe):
    assert bench_recipe.cpu_env(None) == {}
    assert bench_recipe.cpu_env("avx2") == {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
    with pytest.raises(ConfigError, match="cpu_kind='avx3'"):
        bench_recipe.cpu_env("avx3")
    cfg = compose_bench("recipe", "ours='experiment=X seed=1'")
    assert bench_recipe.as_list(cfg.ours) == ["experiment=X", "seed=1"]
    assert bench_recipe.as_list(compose_bench("recipe").ours) == ["experiment=shakespeare_char_cpu"]
    assert "--max_iters=2000" in bench_recipe.as_list(compose_bench("recipe").nanogpt_args)


def test_bench_ablate_reads_steps_to_a_loss_between_validations(bench_ablate):
    curve = [(25, 3.0), (50, 2.0), (75, 1.5)]
    assert bench_ablate.steps_to(curve, 2.0) == 50.0
    assert bench_ablate.steps_to(curve, 1.75) == 62.5  # halfway between 2.0 at 50 and 1.5 at 75
    assert bench_ablate.steps_to(curve, 3.5) == 25.0  # reached by the first validation
    assert bench_ablate.steps_to(curve, 1.4) is None


def test_bench_ablate_calls_an_option_helpful_only_beyond_the_seed_spread(bench_ablate):
    def row(*finals):
        return {"final": bench_ablate.spread(list(finals))}

    baseline = row(1.90, 1.91, 1.92)  # std 0.01
    assert bench_ablate.helped(row(1.87, 1.88, 1.89), baseline)  # 0.03 lower
    assert not bench_ablate.helped(row(1.90, 1.905, 1.91), baseline)  # 0.005 lower: within the spread
    assert not bench_ablate.helped(row(1.80, 1.88, 1.96), baseline)  # 0.03 lower, but std 0.08


def test_bench_recipe_python_runs_both_with_the_interpreter_given(bench_recipe, tmp_path, monkeypatch):
    assert bench_recipe.interpreter(None) == sys.executable
    with pytest.raises(ConfigError, match="no such interpreter"):
        bench_recipe.interpreter(str(tmp_path / "venv" / "bin" / "python"))
    # Every run (nanoGPT's data step, both recipes) starts with the python given, not this one.
    python = tmp_path / "venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.symlink_to(sys.executable)
    for name in bench_recipe.NANOGPT_FILES:
        (tmp_path / "nanogpt" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "nanogpt" / name).write_text("")
    started = []

    def timed(cmd, cwd, env):
        started.append(cmd[0])
        return 1.0, NANOGPT_OUTPUT + OURS_OUTPUT

    monkeypatch.setattr(bench_recipe, "timed", timed)
    monkeypatch.setattr(bench_recipe, "prepare_ours", lambda overrides: "cache")
    out = tmp_path / "recipe.json"
    cfg = compose_bench(
        "recipe", f"nanogpt_dir={tmp_path / 'nanogpt'}", f"python={python}", "rounds=1", f"out={out}"
    )
    bench_recipe.main.__wrapped__(cfg)
    assert started == [str(python)] * 3
    assert json.loads(out.read_text())["python"] == str(python)
