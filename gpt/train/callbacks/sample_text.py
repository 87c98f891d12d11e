"""SampleText: a short generated text every N steps, to <run dir>/samples.txt and the loggers."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L

from gpt.config import SamplingConfig, sampling_config
from gpt.generate.text import generate_text
from gpt.templates import format_prompt


class SampleText(L.Callback):
    """Every N optimizer steps, generate a short text from the model being trained and write it to
    <run dir>/samples.txt and to any logger with a `log_text` (wandb's text table).

    Sampling uses its own seeded generator: the training run's random streams are untouched.
    """

    def __init__(
        self,
        every_n_steps: int = 500,
        prompt: str = "\n",
        max_new_tokens: int = 200,
        sampling: SamplingConfig | Mapping[str, Any] | None = None,
        seed: int = 0,
    ) -> None:
        self.every_n_steps, self.prompt, self.max_new_tokens = every_n_steps, prompt, max_new_tokens
        # From conf/ a plain mapping (no _target_ for a dataclass), checked like generate.py's keys.
        mapping = isinstance(sampling, Mapping)
        self.sampling = sampling_config(None, **sampling) if mapping else sampling_config(sampling)
        self.seed = seed

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: object) -> None:
        step = trainer.global_step
        if (
            self.every_n_steps <= 0
            or step == 0
            or step % self.every_n_steps
            or trainer.fit_loop._should_accumulate()
        ):
            return
        if trainer.is_global_zero:
            self.write(trainer, step, self.sample(pl_module))

    def sample(self, pl_module: L.LightningModule) -> str:
        model = pl_module.model
        was_training = model.training
        # A model trained on pairs is prompted as it is taught, with its template (as generate.py does).
        fmt = getattr(pl_module, "hparams", {}).get("data_format")
        prompt = format_prompt(fmt, self.prompt) if fmt else self.prompt
        model.eval()
        try:
            text = generate_text(
                model,
                pl_module.tokenizer,
                prompt,
                self.max_new_tokens,
                sampling=self.sampling,
                seed=self.seed,
            )
        finally:
            model.train(was_training)
        return prompt + text

    @staticmethod
    def write(trainer: L.Trainer, step: int, text: str) -> None:
        with open(Path(trainer.default_root_dir) / "samples.txt", "a", encoding="utf-8") as f:
            f.write(f"=== step {step}\n{text}\n")
        for logger in trainer.loggers:
            if hasattr(logger, "log_text"):
                logger.log_text(key="samples", columns=["step", "text"], data=[[step, text]], step=step)
