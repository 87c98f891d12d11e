"""Where the callbacks' lines go: one logger (named as before the callbacks were split, as train.log
shows it), or print where logging is not set up."""

from __future__ import annotations

import logging

log = logging.getLogger("gpt.train.callbacks")


def report(message: str) -> None:
    """Log at INFO; print where logging is not set up (no handler would show it): outside Hydra,
    or in the processes ddp_spawn starts."""
    if log.isEnabledFor(logging.INFO) and log.hasHandlers():
        log.info(message)
    else:
        print(message)
