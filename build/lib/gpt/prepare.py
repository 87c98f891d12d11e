"""`python -m gpt.prepare`: the same command as prepare.py at the repository root."""

import runpy
from pathlib import Path

if __name__ == "__main__":
    runpy.run_path(str(Path(__file__).resolve().parents[1] / "prepare.py"), run_name="__main__")
