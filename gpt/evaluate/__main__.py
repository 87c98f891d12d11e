"""`python -m gpt.evaluate`: the same as `python evaluate.py` (run through runpy, so that gpt/ itself
imports no Hydra)."""

import runpy
from pathlib import Path

if __name__ == "__main__":
    runpy.run_path(str(Path(__file__).resolve().parents[2] / "evaluate.py"), run_name="__main__")
