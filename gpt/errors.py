"""Errors a user can cause and fix.

Entry points catch `UserError` and print its message as one line (what was wrong, what to do)
with a non-zero exit; every other exception is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input: a config value, a path, a prompt, a checkpoint."""


class ConfigError(UserError, ValueError):
    """A config value that fails validation."""


class NonFiniteError(RuntimeError):
    """Training met a non-finite loss, gradient or weight. Not bad input, but the same kind of
    ending: one line (the step, the last good checkpoint, what to try) and a non-zero exit."""
