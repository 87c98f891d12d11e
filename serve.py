"""Serve a trained GPT: an OpenAI-compatible API (/v1/completions, /v1/chat/completions, streamed)
with continuous batching, and a chat page at /.

python serve.py                                        # newest run under runs/, http://127.0.0.1:8000
python serve.py ckpt=runs/2026-01-01/12-00-00 port=8080 api_key=secret
"""

from __future__ import annotations

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from gpt.config import ServeConfig
from gpt.errors import exit_on_user_error
from gpt.serve.command import serve

ConfigStore.instance().store(name="_schema", node=ServeConfig)


@hydra.main(version_base="1.3", config_path="conf", config_name="serve")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    serve(OmegaConf.to_object(cfg))


if __name__ == "__main__":
    exit_on_user_error(main)()
