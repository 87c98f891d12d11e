"""Training with Lightning: the LightningModule, optimizers and schedules, callbacks, checkpoints, run
dirs, and the checks made before fitting."""
