"""Sample from a trained GPT, streamed to stdout. Imports no Lightning, so it starts fast.

python generate.py prompt="ROMEO:"                     # newest run under runs/
python generate.py ckpt=runs/2026-01-01/12-00-00 temperature=0.5 num_samples=3
"""

from __future__ import annotations

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from gpt.config import GenerateConfig
from gpt.errors import exit_on_user_error
from gpt.generate.command import sample

ConfigStore.instance().store(name="_schema", node=GenerateConfig)


@hydra.main(version_base="1.3", config_path="conf", config_name="generate")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    sample(OmegaConf.to_object(cfg))


if __name__ == "__main__":
    exit_on_user_error(main)()
