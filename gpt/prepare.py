"""python -m gpt.prepare is deprecated and goes in the next release; use python prepare.py"""

import runpy
import sys
from pathlib import Path

if __name__ == "__main__":
    print(f"note: {__doc__}", file=sys.stderr)
    runpy.run_path(str(Path(__file__).resolve().parents[1] / "prepare.py"), run_name="__main__")
