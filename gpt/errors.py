"""Errors a user can cause and fix.

Entry points catch `UserError` and print its message as one line (what was wrong, what to do)
with a non-zero exit; every other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno
import functools
import os
import re
import sys
from collections.abc import Callable
from typing import TypeVar


class UserError(Exception):
    """Bad input: a config value, a path, a prompt, a checkpoint."""


class ConfigError(UserError, ValueError):
    """A config value that fails validation."""


class NonFiniteError(RuntimeError):
    """Training met a non-finite loss, gradient or weight. Not bad input, but the same kind of
    ending: one line (the step, the last good checkpoint, what to try) and a non-zero exit."""


T = TypeVar("T")
EXIT_USER_ERROR = 2
# Training stopped on a non-finite loss or gradient; nothing non-finite was saved.
EXIT_NONFINITE = 3
# Training stopped by SIGTERM after saving a checkpoint (128 + signal 15, as a shell reports it):
# not finished, resumable by the command it prints (the same one, on the same run dir).
EXIT_PREEMPTED = 143
# Training stopped by Ctrl-C (128 + SIGINT's 2, as a shell reports it): after saving a checkpoint,
# or at once on a second Ctrl-C; resumable by the command it prints.
EXIT_INTERRUPTED = 130
# Errors of these libraries are about the config the user wrote. They are recognised by module so
# that gpt/ never imports Hydra or OmegaConf.
CONFIG_ERROR_MODULES = ("hydra.", "omegaconf.")
CONFIG_ERROR_NAMES = ("MisconfigurationException",)


def first_line(e: BaseException, limit: int | None = None) -> str:
    """The message's first line, with the next one when it ends in ':' (Hydra's "Error in call...:",
    torch's "Error(s) in ...:"), cut to `limit` characters if given (a list of missing weights can
    be long)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    if not lines:
        return type(e).__name__
    line = f"{lines[0]} {lines[1]}" if lines[0].endswith(":") and len(lines) > 1 else lines[0]
    line = line.rstrip(".")
    return line if limit is None or len(line) <= limit else line[: limit - 3] + "..."


# Errors of the machine rather than the code: no permission, a read-only or full filesystem.
ENVIRONMENT_ERRNOS = (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT)


def is_user_error(e: BaseException) -> bool:
    return (
        isinstance(e, UserError)
        or (isinstance(e, OSError) and e.errno in ENVIRONMENT_ERRNOS)
        or type(e).__module__.startswith(CONFIG_ERROR_MODULES)
        or type(e).__name__ in CONFIG_ERROR_NAMES
    )


# Hydra's words for an override it read as several values (commas) or a sweep (range(1,3), ...) in
# a command that runs once: raised when the config is composed, not when it is parsed.
SWEEP_OVERRIDE = re.compile(
    r"(Ambiguous value for argument|Sweep parameters) '(.*?)'(?: requires --multirun)?(?:\n|$)", re.S
)
# Keys whose value is free text: the command that takes it, and its key for a file of them. No
# quoting on a command line carries every text (an apostrophe inside Hydra's quotes inside the
# shell's), so these commands also read it from stdin (`prompt=-`) and from a file.
FREE_TEXT = {"prompt": ("generate.py", "prompt_file")}


def shell_echo(text: str) -> str | None:
    """An `echo` of `text` that any POSIX shell prints as it is; None where there is none (a
    backslash, which zsh's and dash's echo read as an escape; a newline; a leading `-`, an option)."""
    if "\\" in text or "\n" in text or text.startswith("-"):
        return None
    if not set('"$`!') & set(text):
        return f'echo "{text}"'
    return f"echo '{text}'" if "'" not in text else None


def any_text(key: str, value: str) -> str | None:
    """For a free-text key (FREE_TEXT), the forms of its command that take any text."""
    key = key.lstrip("+")
    if key not in FREE_TEXT:
        return None
    command, file_key = FREE_TEXT[key]
    echo = shell_echo(value)
    example = f"{echo} | python {command} {key}=-" if echo else f"python {command} {key}=- < FILE"
    return (
        f"for any text, quotes and apostrophes included: {key}=- reads it from stdin ({example}), "
        f"{file_key}=FILE from a file (one per line)"
    )


def unparsed_override(override: str, sweep: str | None = None) -> str:
    """How to quote the argument Hydra could not parse (an unquoted `~`, `?`, accent, ...), or
    read as several values (sweep="commas") or a sweep ("sweep"); for free text (FREE_TEXT), also
    how to pass any text."""
    key, sep, value = override.partition("=")
    free = any_text(key, value) if sep else None
    why = {
        None: "",
        "commas": " (Hydra reads its commas as a list of values)",
        "sweep": " (Hydra reads a sweep)",
    }
    msg = f"could not parse the override {override!r}{why[sweep]}; "
    # Quoting the value helps when the key is fine and the value is no list, dict or quote itself.
    if sep and re.fullmatch(r"\+{0,2}[\w./-]+", key) and not set("\"'[{") & set(value):
        msg += f"""put the value in quotes inside the argument: '{key}="{value}"'"""
        if sweep == "commas" and free is None:
            msg += f" (a list: '{key}=[{value}]'; a sweep: --multirun)"
        return msg + (f", or {free}" if free else "")
    if free is not None:
        return msg + free
    return msg + (
        "put values with spaces or special characters in quotes inside the argument: "
        """'prompt="Hello, world!"'"""
    )


def missing_config(e: BaseException) -> str:
    """Hydra's "Could not find 'optim/sgd'" and its list of options, as one line."""
    missing = getattr(e, "missing_cfg_file", None)
    group, _, name = (missing or "").rpartition("/")
    if not group:  # the primary config itself (--config-name)
        return first_line(e)
    msg = f"there is no {group}={name}"
    parent = re.match(r"In '([^']+)':", first_line(e))
    if parent and "/" in parent[1] and not parent[1].startswith("hydra/"):
        msg += f" (asked for in {parent[1]})"  # by a config file, not on the command line
    # Schemas (_schema) are not choices.
    options = [o for o in getattr(e, "options", None) or () if not o.startswith("_")]
    return f"{msg}; choose one of {', '.join(options)}" if options else f"{msg}; {group}/ holds no configs"


def describe(e: BaseException) -> str:
    """One line: the error, and the config error beneath it if Hydra wrapped one."""
    if type(e).__name__ == "OverrideParseException":
        override = getattr(e, "override", None) or first_line(e).split(": ", 1)[-1]
        return unparsed_override(override)
    sweep = SWEEP_OVERRIDE.match(str(e)) if type(e).__name__ == "ConfigCompositionException" else None
    if sweep:
        return unparsed_override(sweep[2], "commas" if sweep[1].startswith("Ambiguous") else "sweep")
    if type(e).__name__ == "MissingConfigException":  # an OSError too, but about the config
        return missing_config(e)
    if isinstance(e, OSError) and e.errno is not None:
        where = f" ({e.filename})" if e.filename else ""
        return f"{e.strerror}{where}; check permissions and free space, or choose another location"
    msg = first_line(e)
    cause = e.__cause__
    while cause is not None and type(cause).__module__.startswith(CONFIG_ERROR_MODULES):
        msg += f": {first_line(cause)}"
        cause = cause.__cause__
    if isinstance(cause, UserError):
        msg = first_line(cause)
    if type(e).__module__.startswith("hydra.") and not isinstance(cause, UserError):
        msg += " (--cfg job prints the config and its keys)"
    return msg


def exit_on_user_error(fn: Callable[..., T]) -> Callable[..., T]:
    """Print a user error as one line and exit with EXIT_USER_ERROR; let bugs raise.

    Entry points apply it twice: around the Hydra task function (Hydra would print its own line
    for an exception raised there, but lets SystemExit through) and around the whole Hydra main,
    for errors in composing the config (HYDRA_FULL_ERROR=1 makes Hydra pass those on to us instead
    of printing them over several lines and exiting with 1; it is set whatever the user's value).
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        os.environ["HYDRA_FULL_ERROR"] = "1"
        try:
            return fn(*args, **kwargs)
        except NonFiniteError as e:
            print(f"error: {first_line(e)}", file=sys.stderr)
            sys.exit(EXIT_NONFINITE)
        except Exception as e:
            if not is_user_error(e):
                raise
            print(f"error: {describe(e)}", file=sys.stderr)
            sys.exit(EXIT_USER_ERROR)

    return wrapper
