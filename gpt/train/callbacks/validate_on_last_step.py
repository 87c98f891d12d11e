"""ValidateOnLastStep: validate the final weights too, not only every val_check_interval steps."""

from __future__ import annotations

import lightning as L


class ValidateOnLastStep(L.Callback):
    """Validate after the last optimizer step too, not only every val_check_interval steps.

    Without it a run of 2,000 steps validating every 300 ends with no validation of its final
    weights, and its best checkpoint never considers them. Lightning validates when a callback asks
    training to stop (`should_stop`); at max_steps training stops anyway, so asking changes nothing
    else.
    """

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        if 0 < trainer.max_steps <= trainer.global_step:
            trainer.should_stop = True
