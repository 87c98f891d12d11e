"""`python -m gpt.evaluate`: evaluate.py's entry, with its Hydra config read from the package
(pkg://gpt.conf: conf/ ships as gpt.conf, see pyproject.toml), so that it works wherever gpt is
installed. An entry point like the root scripts, so the one module in gpt/ that imports Hydra."""

from __future__ import annotations

from importlib.util import find_spec

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from gpt.config import DataConfig, EvaluateConfig
from gpt.errors import UserError, exit_on_user_error
from gpt.evaluate.command import evaluate_checkpoint

cs = ConfigStore.instance()
cs.store(name="_schema", node=EvaluateConfig)
cs.store(group="data", name="_schema", node=DataConfig)


def to_config(cfg: DictConfig) -> EvaluateConfig:
    """The composed config as the dataclass. data=pairs without a data.path (the default) is no data
    given: the task's own (hellaswag: its validation set; bpb: the checkpoint's training data)."""
    if cfg.data.source == "pairs" and OmegaConf.select(cfg, "data.path", throw_on_missing=False) is None:
        cfg.data = None
    return OmegaConf.to_object(cfg)


def run(cfg: DictConfig) -> None:
    """The body of both entries: evaluate.py's and this one."""
    evaluate_checkpoint(to_config(cfg))


@hydra.main(version_base="1.3", config_path="pkg://gpt.conf", config_name="evaluate")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    run(cfg)


def check_installed() -> None:
    if find_spec("gpt.conf") is None:  # an editable install made before 0.5.0 maps no gpt.conf
        raise UserError(
            "the configs (gpt.conf) are not installed with gpt: run pip install -e . again, "
            "or python evaluate.py in the checkout"
        )


if __name__ == "__main__":
    exit_on_user_error(check_installed)()
    exit_on_user_error(main)()
