"""Evaluate a checkpoint by generation on prompt -> completion pairs: exact match, token accuracy,
chrF and BLEU for each decoding method, a table on stdout, each example's outputs in <run dir>/evals/.

python evaluate.py ckpt=runs/2026-11-21/14-06-53 data.path=test.jsonl
python evaluate.py ckpt=RUN data.path=test.jsonl methods=[greedy,beam] num_beams=4 limit=200
"""

from __future__ import annotations

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from gpt.config import DataConfig, EvaluateConfig
from gpt.errors import exit_on_user_error
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


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    evaluate_checkpoint(to_config(cfg))


if __name__ == "__main__":
    exit_on_user_error(main)()
