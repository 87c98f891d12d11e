"""The Hydra config tree: every preset composes and validates; bad overrides fail early and clearly."""

from pathlib import Path

import pytest
from omegaconf import OmegaConf

import train
from gpt.config import DataConfig, GenerateConfig, ModelConfig, OptimConfig
from gpt.errors import ConfigError
from gpt.model.transformer import GPT
from gpt.runs.checkpoint import find_checkpoint
from gpt.train.checks import check_trainer_args
from gpt.train.setup import choose_precision, vocab_size
from tests.helpers import CONF, compose_train, generate_config


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("model", group_options("model"))
def test_model_presets_validate(model):
    cfg = compose_train(f"model={model}")
    model_cfg, _, _ = train.to_dataclasses(cfg)
    assert isinstance(model_cfg, ModelConfig)


def test_model_config_defaults_are_the_default_preset():
    assert train.to_dataclasses(compose_train())[0] == ModelConfig()


@pytest.mark.parametrize(
    ("preset", "vocab", "low", "high"),
    [
        ("nano", 65, 0.7e6, 0.95e6),
        ("small", 65, 9e6, 11.5e6),
        ("medium", 50257, 118e6, 130e6),
        ("large", 50257, 330e6, 370e6),
    ],
)
def test_preset_sizes(preset, vocab, low, high):
    cfg = compose_train(f"model={preset}")
    model_cfg = OmegaConf.to_object(cfg.model)
    model_cfg.vocab_size = vocab
    import torch

    with torch.device("meta"):
        n = GPT(model_cfg).num_params()
    assert low < n < high, f"{preset}: {n:,} parameters"


@pytest.mark.parametrize("data", group_options("data"))
def test_data_presets_validate(data):
    extra = ["data.path=some/dir"] if data in ("text", "pairs") else []
    _, data_cfg, _ = train.to_dataclasses(compose_train(f"data={data}", *extra))
    assert isinstance(data_cfg, DataConfig)


@pytest.mark.parametrize("optim", group_options("optim"))
def test_optim_presets_validate(optim):
    assert isinstance(train.to_dataclasses(compose_train(f"optim={optim}"))[2], OptimConfig)


@pytest.mark.parametrize("experiment", group_options("experiment"))
def test_experiments_compose(experiment):
    cfg = compose_train(f"experiment={experiment}")
    train.to_dataclasses(cfg)


def test_unknown_key_fails_at_compose_time():
    with pytest.raises(Exception, match="n_layr") as info:
        compose_train("model.n_layr=2")
    assert "ModelConfig" in str(info.value.__cause__)


def test_wrong_type_fails_at_compose_time():
    with pytest.raises(Exception, match="n_layer"):
        compose_train("model.n_layer=two")


@pytest.mark.parametrize(
    "overrides",
    [
        *([f"trainer={t}"] for t in group_options("trainer")),
        *([f"experiment={e}"] for e in group_options("experiment")),
        ["trainer.devices=[0,1]", "trainer.precision=16", "trainer.val_check_interval=0.5"],
        ["trainer.devices=auto", "trainer.val_check_interval=00:01:00:00", "+trainer.max_time=00:12:00:00"],
        ["trainer.devices=-1", "trainer.gradient_clip_val=null", "trainer.log_every_n_steps=null"],
    ],
)
def test_trainer_args_of_the_presets_and_of_each_accepted_type_pass(overrides):
    check_trainer_args(OmegaConf.to_container(compose_train(*overrides).trainer))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("trainer.max_steps=abc", "trainer.max_steps='abc' must be an integer (-1: no limit)"),
        ("trainer.max_steps=1.5", "trainer.max_steps=1.5 must be an integer"),
        ("trainer.max_steps=true", "trainer.max_steps=true must be an integer"),
        ("trainer.max_steps=null", "trainer.max_steps=null must be an integer"),
        ("trainer.val_check_interval=often", "trainer.val_check_interval='often' must be a number of steps"),
        ("trainer.devices=two", "trainer.devices='two' must be a number of devices"),
        ("trainer.devices=[a]", "trainer.devices=['a'] must be a number of devices"),
        ("trainer.num_nodes=2.0", "trainer.num_nodes=2.0 must be an integer"),
        ("trainer.accumulate_grad_batches=x", "trainer.accumulate_grad_batches='x' must be an integer"),
        ("trainer.log_every_n_steps=1e1", "trainer.log_every_n_steps=10.0 must be an integer (or null)"),
        ("trainer.gradient_clip_val=off", "trainer.gradient_clip_val='off' must be a number (or null)"),
        ("trainer.precision=16.5", "trainer.precision=16.5 must be a name such as 32-true or bf16-mixed"),
        ("trainer.use_distributed_sampler=1", "trainer.use_distributed_sampler=1 must be true or false"),
    ],
)
def test_trainer_args_of_a_wrong_type_fail_before_lightning(override, message):
    with pytest.raises(ConfigError) as info:
        check_trainer_args(OmegaConf.to_container(compose_train(override).trainer))
    assert str(info.value).startswith(message)


def test_tilde_in_config_paths_is_the_home_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    data = DataConfig(source="text", path="~/corpus", root="~/data", cache_dir="~/cache")
    assert (data.path, data.root, data.cache_dir) == tuple(
        str(tmp_path / n) for n in ("corpus", "data", "cache")
    )
    assert generate_config(prompt_file="~/prompts.txt").prompt_file == str(tmp_path / "prompts.txt")
    assert DataConfig(source="hf", path="user/dataset").path == "user/dataset"  # not a path: unchanged
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "last.ckpt").write_bytes(b"")
    assert find_checkpoint("~/run") == tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert find_checkpoint(None, runs_dir="~") == tmp_path / "run" / "checkpoints" / "last.ckpt"


def test_indivisible_heads_fail_with_values():
    cfg = compose_train("model.n_head=5")
    with pytest.raises(ConfigError, match="n_embd=128 is not divisible by model.n_head=5"):
        train.to_dataclasses(cfg)


@pytest.mark.parametrize(
    ("cls", "kwargs", "message"),
    [
        (ModelConfig, dict(pos_emb="alibi"), "model.pos_emb='alibi' is not one of"),
        (ModelConfig, dict(dropout=1.0), "dropout"),
        (DataConfig, dict(source="text"), "data.path"),
        (DataConfig, dict(val_fraction=0), "val_fraction"),
        (OptimConfig, dict(lr=0), "optim.lr"),
        (GenerateConfig, dict(temperature=-1), "temperature=-1"),
        (GenerateConfig, dict(top_p=1.5), "top_p=1.5"),
        (GenerateConfig, dict(top_k=0), "top_k=0"),
        (GenerateConfig, dict(max_new_tokens=0), "max_new_tokens=0"),
    ],
)
def test_validation_messages(cls, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        cls(**kwargs)


def instantiate_in(run_dir: Path, *overrides: str):
    """Build trainer, callbacks and loggers as train.py does, with Hydra's run dir set to run_dir."""
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    cfg = compose_train(*overrides)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(run_dir)
    HydraConfig.instance().set_config(cfg)
    choose_precision(cfg.trainer, cfg.model.n_embd, [])
    callbacks = {k: hydra.utils.instantiate(c) for k, c in cfg.callbacks.items()}
    loggers = {k: hydra.utils.instantiate(c) for k, c in cfg.logger.items()}
    trainer = hydra.utils.instantiate(
        cfg.trainer, logger=list(loggers.values()), callbacks=list(callbacks.values())
    )
    return trainer, callbacks, loggers


def test_checkpoints_and_logs_go_to_the_run_dir(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    trainer, callbacks, loggers = instantiate_in(tmp_path)
    best, last = callbacks["checkpoint"], callbacks["last"]
    assert isinstance(best, ModelCheckpoint) and best.monitor == "val/loss" and best.save_top_k == 1
    assert isinstance(last, ModelCheckpoint) and last.save_last and last.monitor == "step"
    assert best.dirpath == last.dirpath == str(tmp_path / "checkpoints")
    assert (
        isinstance(loggers["csv"], CSVLogger)
        and Path(loggers["csv"].log_dir) == tmp_path / "csv" / "version_0"
    )
    assert trainer.max_steps == 2000 and trainer.default_root_dir == str(tmp_path)


@pytest.mark.parametrize("logger", group_options("logger"))
def test_every_logger_option_keeps_csv(tmp_path, logger):
    _, _, loggers = instantiate_in(tmp_path, f"logger={logger}")
    assert "csv" in loggers and (logger == "csv" or logger in loggers)


def test_vocab_size_follows_tokenizer_or_pads_upward():
    assert vocab_size(None, 65) == 65
    assert vocab_size(128, 65) == 128
    with pytest.raises(ConfigError, match="model.vocab_size=64 is smaller than the tokenizer's 65 tokens"):
        vocab_size(64, 65)


def test_fsdp_preset_shards_each_block():
    import hydra

    from gpt.model.transformer import Block

    cfg = compose_train("trainer=fsdp", "trainer.strategy.activation_checkpointing=true")
    strategy = hydra.utils.instantiate(cfg.trainer.strategy)
    assert strategy.kwargs["auto_wrap_policy"]._module_classes == {Block}
    assert strategy._activation_checkpointing_kwargs["auto_wrap_policy"]._module_classes == {Block}
    assert cfg.trainer.precision == "auto"


def test_data_fields_take_a_mapping_from_the_command_line():
    """Hydra refuses new keys in a typed (even empty) mapping: data.fields is Any, checked here."""
    mapped = "data.fields={prompt: question, completion: answer}"
    cfg = compose_train("data=pairs", "data.path=x.jsonl", mapped)
    assert train.to_dataclasses(cfg)[1].fields == {"prompt": "question", "completion": "answer"}
    assert train.to_dataclasses(compose_train("data=pairs", "data.path=x.jsonl"))[1].fields == {}
    with pytest.raises(ConfigError, match="data.fields=3 must map our field names to yours"):
        train.to_dataclasses(compose_train("data=pairs", "data.path=x.jsonl", "data.fields=3"))
