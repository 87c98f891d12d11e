"""Compare training runs from their run dirs: a table on stdout and a loss plot, no wandb account needed.

python compare.py runs='runs/2026-11-21/*'                       # a glob: compare expands it
python compare.py runs=[runs/multirun/2026-11-21/10-00-00] out=sweep.png   # a folder of runs
"""

from __future__ import annotations

import sys

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from gpt.config import CompareConfig
from gpt.errors import exit_on_user_error
from gpt.runs.compare import compare_runs

ConfigStore.instance().store(name="_schema", node=CompareConfig)

# Hydra's flags that take a value, which is no run dir (--info takes one only if it is a topic).
HYDRA_VALUE_FLAGS = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn"}
HYDRA_VALUE_FLAGS |= {"--config-dir", "-cd", "--experimental-rerun"}
INFO_TOPICS = {"all", "config", "defaults", "defaults-tree", "plugins", "searchpath"}
NEW_FORM = "python compare.py runs=[DIR,...] out=PLOT"


def is_run_dir_arg(arg: str) -> bool:
    """A run dir or glob given the old way: no key=value, unless the `key` is a path (runs/lr=0.1)."""
    key, sep, _ = arg.partition("=")
    return not arg.startswith("-") and (not sep or ("/" in key and not key.lstrip("+~").startswith("hydra")))


def quoted(value: str) -> str:
    """The value as a Hydra override reads it back, spaces, commas and brackets included."""
    return "'" + value.replace("'", "\\'") + "'"


def new_argv(argv: list[str], command: str = "python compare.py") -> tuple[list[str], str | None]:
    """argv with the old flags (RUN_DIR... and --out PLOT or --out=PLOT) as runs=[...] out=PLOT,
    and the deprecation note to print: for old flags, or for a deprecated `command`; None if neither.
    Overrides and Hydra's flags with their values pass as they are."""
    kept, runs, out, i = [], [], None, 0
    while i < len(argv):
        arg, value = argv[i], argv[i + 1] if i + 1 < len(argv) else None
        if arg == "--out" and value is not None:
            out, i = value, i + 2
            continue
        if arg in HYDRA_VALUE_FLAGS or (arg in ("--info", "-i") and value in INFO_TOPICS):
            kept += argv[i : i + 2]
            i += 2
            continue
        if arg.startswith("--out="):
            out = arg.removeprefix("--out=")
        elif is_run_dir_arg(arg):
            runs.append(arg)
        else:
            kept.append(arg)
        i += 1
    kept += [f"runs=[{','.join(map(quoted, runs))}]"] if runs else []
    kept += [f"out={quoted(out)}"] if out is not None else []
    if runs or out is not None:
        old = f"{command} RUN_DIR... --out PLOT"
        return kept, f"note: {old} is deprecated and goes in the next release; use {NEW_FORM}"
    if command != "python compare.py":
        return kept, f"note: {command} is deprecated and goes in the next release; use python compare.py"
    return kept, None


@hydra.main(version_base="1.3", config_path="conf", config_name="compare")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    compare_runs(OmegaConf.to_object(cfg))


if __name__ == "__main__":
    # The deprecated `python -m gpt.compare` runs this file with its name in `invoked_as`.
    sys.argv[1:], note = new_argv(sys.argv[1:], globals().get("invoked_as", "python compare.py"))
    if note:
        print(note, file=sys.stderr)
    exit_on_user_error(main)()
