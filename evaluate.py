"""Evaluate a checkpoint by generation on prompt -> completion pairs: exact match, token accuracy,
chrF and BLEU for each decoding method, a table on stdout, each example's outputs in <run dir>/evals/.

python evaluate.py ckpt=runs/2026-11-21/14-06-53 data.path=test.jsonl
python evaluate.py ckpt=RUN data.path=test.jsonl methods=[greedy,beam] num_beams=4 limit=200
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from gpt.errors import exit_on_user_error
from gpt.evaluate.__main__ import run  # `python -m gpt.evaluate`'s body, schemas registered there


# conf/ of this checkout, so that it runs without gpt being installed (python -m gpt.evaluate reads
# the copy that ships as gpt.conf).
@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    exit_on_user_error(main)()
