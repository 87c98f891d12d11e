"""What train.py prints: one line per event, on the console and in <run dir>/train.log.

Hydra's job logging (conf/hydra/job_logging/quiet.yaml) gives the root logger two handlers, the
console and train.log. This module holds the console handler it names, and `quiet_lightning()`,
which train.py calls once Lightning is imported: Lightning's lines then go through those two
handlers only, and the warnings known to be false or useless here are silenced, each at its source.
Nothing here imports Lightning, so the config can name this module before Lightning is loaded.
"""

from __future__ import annotations

import logging
import warnings

from lightning_utilities.core import rank_zero
from tqdm import tqdm

# Warnings that say nothing true or actionable about a run of train.py, each matched by its own
# message (and category) so that any other warning still shows.
KNOWN_FALSE_WARNINGS = (
    # Lightning 2.6 builds torch.utils._pytree.LeafSpec, which torch 2.13 deprecates: nothing in
    # this project uses it and nothing a user can change. Printed once per run.
    (FutureWarning, r"`isinstance\(treespec, LeafSpec\)` is deprecated"),
    # Printed on every resume because Lightning only knows loaders with state_dict/load_state_dict.
    # False here: GPTDataModule saves and restores its sampler's position itself and a resumed run
    # is bit-identical to an uninterrupted one (tests/commands/test_faults.py).
    (UserWarning, r"You're resuming from a checkpoint that ended before the epoch ended and your dataloader"),
)


class ConsoleHandler(logging.StreamHandler):
    """A StreamHandler that writes through tqdm, so a line logged while a progress bar is drawn
    (a validation result, Lightning's "`Trainer.fit` stopped") gets a line of its own instead of
    being glued to the end of the bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=self.stream)
            self.flush()
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)


class DropLitLoggerTip(logging.Filter):
    """Drops the tip Lightning logs at every Trainer creation, an advertisement for its litlogger
    package (Trainer has no switch for it)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "try installing [litlogger]" not in record.getMessage()


def quiet_lightning() -> None:
    """Call after `import lightning`: its lines reach the console and train.log once, and the known
    false warnings are gone."""
    for category, message in KNOWN_FALSE_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    tip_logger = rank_zero.log  # the logger of Lightning's rank_zero_info, which logs the tip
    if not any(isinstance(f, DropLitLoggerTip) for f in tip_logger.filters):
        tip_logger.addFilter(DropLitLoggerTip())
    # `import lightning` gives the "lightning" logger a console handler of its own ("INFO: ..." on
    # stderr), and the same records also reach the root logger's handlers: every line twice.
    # Where the root logger has handlers (Hydra's job logging), they are the ones kept.
    if logging.getLogger().handlers:
        lightning_logger = logging.getLogger("lightning")
        for handler in list(lightning_logger.handlers):
            lightning_logger.removeHandler(handler)


class DropMessages(logging.Filter):
    """Drops the records whose message contains one of `texts`."""

    def __init__(self, *texts: str) -> None:
        super().__init__()
        self.texts = texts

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(text in record.getMessage() for text in self.texts)


# Lines Lightning logs about a stop or a save that say something false here, by logger (None: that
# of Lightning's rank_zero_info, which `import lightning` sets).
FALSE_LINES = {
    # Logged when a second Ctrl-C stops a run: train.py says what stopped and how to continue.
    None: ("Detected KeyboardInterrupt, attempting graceful shutdown",),
    # Logged by Trainer.save_checkpoint (SLURM's requeue checkpoint) when not told to save weights
    # only: it is about saving everything, which is what a resume needs, and nothing is loaded.
    "lightning.pytorch.trainer.connectors.checkpoint_connector": ("`weights_only` was not set",),
}


def quiet_stops(resuming_in_place: bool) -> None:
    """Call after `import lightning`: drop Lightning's false lines about stops and saves; when a run
    resumes from its own run dir, also its warning that the checkpoint directory "exists and is not
    empty" (it is this run's)."""
    for name, texts in FALSE_LINES.items():
        logger = rank_zero.log if name is None else logging.getLogger(name)
        if not any(isinstance(f, DropMessages) and f.texts == texts for f in logger.filters):
            logger.addFilter(DropMessages(*texts))
    if resuming_in_place:
        warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
