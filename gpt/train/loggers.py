"""What loggers are told about a run: its name from the command line, wandb's fields and mode."""

from __future__ import annotations

import hashlib
import netrc
import os
import re
from pathlib import Path
from urllib.parse import urlparse


def run_overrides(overrides: list[str]) -> list[str]:
    """The command-line overrides that describe the run: not Hydra's own settings, nor what it resumes."""
    return [o for o in overrides if not o.startswith(("hydra.", "ckpt_path="))]


def run_label(overrides: list[str]) -> str:
    """A short readable name from the command-line overrides."""
    return ",".join(run_overrides(overrides)) or "defaults"


def wandb_fields(overrides: list[str], run_dir: str | Path) -> dict[str, object]:
    """Name, group, tags and a stable id for a wandb run.

    The group is the run's overrides without the seed, so seeds of one configuration group
    together; the id is derived from the run dir, so a resumed run continues the same wandb run.
    """
    kept = run_overrides(overrides)
    run_id = hashlib.sha1(str(Path(run_dir).resolve()).encode()).hexdigest()[:16]
    return {
        "name": run_label(overrides),
        "group": run_label([o for o in kept if not re.match(r"^\+*seed=", o)]),
        "tags": [o[:64] for o in kept],  # wandb's tag length limit
        "id": run_id,
        "resume": "allow",
    }


def wandb_api_key_present() -> bool:
    """True when wandb would find credentials: WANDB_API_KEY, or a netrc entry for its host."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    path = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return path.is_file() and netrc.netrc(path).authenticators(host) is not None
    except (netrc.NetrcParseError, OSError):
        return False


def choose_wandb_mode() -> str:
    """Log online when logged in, offline otherwise: wandb never stops to prompt for a key.

    An explicit WANDB_MODE (online, offline, disabled) is left as the user set it.
    """
    if not os.environ.get("WANDB_MODE"):
        os.environ["WANDB_MODE"] = "online" if wandb_api_key_present() else "offline"
    return os.environ["WANDB_MODE"]
