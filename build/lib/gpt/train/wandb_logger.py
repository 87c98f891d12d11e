"""Lightning's WandbLogger without the warning it makes wandb print on every run."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.loggers import WandbLogger as LightningWandbLogger


class WandbLogger(LightningWandbLogger):
    """Lightning's WandbLogger, minus the `anonymous=None` it passes to wandb.init when anonymous
    logging was not asked for. wandb (0.31 here) ignores that setting and prints "The anonymous
    setting has no effect and will be removed in a future version" whenever it is passed at all,
    None included: on every run, about a setting nobody set. Set `anonymous` and it is passed on.
    """

    def __init__(self, *args: Any, anonymous: bool | None = None, **kwargs: Any) -> None:
        super().__init__(*args, anonymous=anonymous, **kwargs)
        if anonymous is None:
            self._wandb_init.pop("anonymous", None)
