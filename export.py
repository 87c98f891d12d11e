"""Export a checkpoint as a Hugging Face directory (transformers loads it with from_pretrained).

python export.py ckpt=runs/2026-11-21/14-06-53 out=exported/        # format chosen from the model
python export.py ckpt=path/to/last.ckpt out=exported/ format=llama dtype=bfloat16
"""

from __future__ import annotations

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from gpt.config import ExportConfig
from gpt.errors import exit_on_user_error
from gpt.runs.export import export_checkpoint

ConfigStore.instance().store(name="_schema", node=ExportConfig)


@hydra.main(version_base="1.3", config_path="conf", config_name="export")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    export_checkpoint(OmegaConf.to_object(cfg))


if __name__ == "__main__":
    exit_on_user_error(main)()
