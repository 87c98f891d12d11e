"""`python -m gpt.compare`: deprecated, it goes in the next release; use `python compare.py`.
compare.py prints the deprecation note: one line, which also covers the old RUN_DIR... --out flags."""

import runpy
from pathlib import Path

if __name__ == "__main__":
    compare = str(Path(__file__).resolve().parents[1] / "compare.py")
    runpy.run_path(compare, init_globals={"invoked_as": "python -m gpt.compare"}, run_name="__main__")
