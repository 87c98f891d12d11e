"""Compare training runs from their run dirs: a table on stdout and a loss plot, no wandb account needed.

python compare.py runs='runs/2026-11-21/*'                       # a glob: compare expands it
python compare.py runs=[runs/multirun/2026-11-21/10-00-00] out=sweep.png   # a folder of runs
"""

from __future__ import annotations

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from gpt.config import CompareConfig
from gpt.errors import exit_on_user_error
from gpt.runs.compare import compare_runs

ConfigStore.instance().store(name="_schema", node=CompareConfig)


@hydra.main(version_base="1.3", config_path="conf", config_name="compare")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    compare_runs(OmegaConf.to_object(cfg))


if __name__ == "__main__":
    exit_on_user_error(main)()
