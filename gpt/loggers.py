"""Logger helpers that need no logger library imported."""

from __future__ import annotations

import netrc
import os
from pathlib import Path
from urllib.parse import urlparse


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
