"""Tokenize a corpus into the cache once, before training: the same presets and overrides as train.py.

python prepare.py data=shakespeare
python prepare.py data=text data.path=notes/ data.tokenizer=char
"""

from __future__ import annotations

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from gpt.config import DataConfig
from gpt.data.prepare import prepare, skipped_note
from gpt.errors import exit_on_user_error

ConfigStore.instance().store(group="data", name="_schema", node=DataConfig)


@hydra.main(version_base="1.3", config_path="conf", config_name="prepare")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    data_cfg: DataConfig = OmegaConf.to_object(cfg.data)
    prepared = prepare(data_cfg)
    meta = prepared.meta
    shards = len(meta["shards"]["train"]) + len(meta["shards"]["val"])
    print(
        f"{'prepared' if prepared.fresh else 'cached'} {prepared.dir}: {meta['train_tokens']:,} train and "
        f"{meta['val_tokens']:,} val tokens ({meta['dtype']}, {shards} shards{skipped_note(meta)})"
    )


if __name__ == "__main__":
    exit_on_user_error(main)()
