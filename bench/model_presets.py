"""The model presets of conf/model/, as train.py composes them (model=<name>): the benchmarks time
the models train.py trains, and restate none of their numbers."""

from __future__ import annotations

from pathlib import Path

from hydra import compose
from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from gpt.config import ModelConfig
from gpt.errors import ConfigError

CONF = Path(__file__).resolve().parents[1] / "conf"
ConfigStore.instance().store(group="model", name="_schema", node=ModelConfig)


def preset_names() -> list[str]:
    return sorted(p.stem for p in (CONF / "model").glob("*.yaml"))


def check_presets(names: list[str]) -> None:
    unknown = [name for name in names if name not in preset_names()]
    if unknown:
        raise ConfigError(f"there is no model={unknown[0]}; choose presets from {', '.join(preset_names())}")


def model_preset(name: str) -> ModelConfig:
    """conf/model/<name>.yaml over ModelConfig, validated. Hydra must be initialized with conf/ as
    its config dir: in a @hydra.main(config_path="../conf") or an initialize_config_dir(conf/)."""
    check_presets([name])
    return OmegaConf.to_object(compose(config_name=f"model/{name}").model)
