"""Train a GPT: compose the Hydra config, turn it into dataclasses and plain data, and hand it to
gpt.train.run (check, build, fit).

Everything a user can get wrong (config, data, devices, checkpoint to resume) is checked before
Lightning is imported, so that a mistake is answered in about two seconds, not six.

python train.py                                   # nano model on Tiny Shakespeare, CPU-friendly
python train.py model=small trainer.devices=4     # any preset, any number of devices
"""

from __future__ import annotations

import sys

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from gpt.config import DataConfig, DecodeConfig, ModelConfig, OptimConfig
from gpt.errors import exit_on_user_error
from gpt.train.run import train
from gpt.train.runtime import keep_freed_memory, skip_final_collection
from gpt.train.setup import HydraRun, TrainJob

cs = ConfigStore.instance()
cs.store(group="model", name="_schema", node=ModelConfig)
cs.store(group="data", name="_schema", node=DataConfig)
cs.store(group="optim", name="_schema", node=OptimConfig)
cs.store(name="_decode_schema", node=DecodeConfig)  # callbacks.evaluate.decoding


def to_dataclasses(cfg: DictConfig) -> tuple[ModelConfig, DataConfig, OptimConfig]:
    """Validated configs (OmegaConf.to_object runs each dataclass's __post_init__)."""
    return OmegaConf.to_object(cfg.model), OmegaConf.to_object(cfg.data), OmegaConf.to_object(cfg.optim)


def to_job(cfg: DictConfig) -> TrainJob:
    """The config as the library takes it: typed configs, and plain dicts for the `_target_` parts."""
    model, data, optim = to_dataclasses(cfg)
    config = OmegaConf.to_container(cfg, resolve=True)
    return TrainJob(model, data, optim, config, instantiate=hydra.utils.instantiate)


def hydra_run(cfg: DictConfig) -> HydraRun:
    hydra_cfg = HydraConfig.get()
    return HydraRun(
        run_dir=hydra_cfg.runtime.output_dir,
        cwd=hydra_cfg.runtime.cwd,
        overrides=list(hydra_cfg.overrides.task),
        multirun=hydra_cfg.mode == RunMode.MULTIRUN,
        argv=list(sys.argv),
        # What Hydra would have written to .hydra/ before the config was even checked.
        record={
            "config.yaml": OmegaConf.to_yaml(cfg),
            "hydra.yaml": OmegaConf.to_yaml(OmegaConf.create({"hydra": hydra_cfg})),
            "overrides.yaml": OmegaConf.to_yaml(list(hydra_cfg.overrides.task)),
        },
    )


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    train(hydra_run(cfg), lambda: to_job(cfg))


if __name__ == "__main__":
    keep_freed_memory()  # CPU steps without page faults (gpt/train/runtime.py); DDP's ranks run this too
    try:
        exit_on_user_error(main)()
    finally:
        skip_final_collection()  # 1.2 s less at exit
