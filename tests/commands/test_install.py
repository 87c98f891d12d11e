"""A non-editable install in a fresh venv, used from another directory: `python -m gpt.evaluate` finds
its config in the package (conf/ ships as gpt.conf) and the Python API loads and samples, with no
checkout on the path. Slow: it builds a wheel and makes a venv."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from gpt.runs.checkpoint import save_weights_checkpoint
from gpt.tokenizer import CharTokenizer
from tests.helpers import CHARS, ROOT, tiny_model

pytestmark = pytest.mark.slow


def run(*cmd: str | Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # nothing but the venv's gpt
    done = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def python(tmp_path_factory) -> Path:
    """A venv's python with the wheel of this checkout installed (the dependencies are this
    interpreter's: --system-site-packages, --no-deps)."""
    tmp = tmp_path_factory.mktemp("install")
    src = tmp / "src"  # a copy, so that the build leaves no build/ in the checkout
    for name in ("gpt", "conf"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    pip = (sys.executable, "-m", "pip")
    run(*pip, "wheel", "-q", "--no-deps", "--no-build-isolation", src, "-w", tmp, cwd=tmp)
    venv.create(tmp / "venv", system_site_packages=True, with_pip=False)
    exe = tmp / "venv" / ("Scripts" if os.name == "nt" else "bin") / "python"
    wheel = next(tmp.glob("*.whl"))
    run(*pip, "--python", exe, "install", "-q", "--no-deps", wheel, cwd=tmp)
    return exe


def test_the_installed_package_is_used(python, tmp_path):
    where = run(
        python, "-c", "import gpt, gpt.conf; print(gpt.__file__); print(gpt.conf.__file__)", cwd=tmp_path
    )
    for line in where.stdout.split():
        assert Path(line).is_relative_to(python.parents[1]) and not Path(line).is_relative_to(ROOT), line


def test_python_m_gpt_evaluate_and_the_api_work_from_an_install(python, tmp_path):
    tok = CharTokenizer(CHARS, eot=True)
    save_weights_checkpoint(
        tiny_model(vocab_size=tok.vocab_size), tok, tmp_path / "run/checkpoints/last.ckpt"
    )
    rows = [{"prompt": "Who is there?", "completion": "Nay"}, {"prompt": "Say yes", "completion": "yes"}]
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert "evaluate is powered by Hydra" in run(python, "-m", "gpt.evaluate", "--help", cwd=tmp_path).stdout
    done = run(python, "-m", "gpt.evaluate", "ckpt=run", "data.path=test.jsonl", "out=here", cwd=tmp_path)
    assert done.stdout.strip().splitlines()[0].split() == ["metric", "greedy"]
    assert len((tmp_path / "here/generate-test.jsonl").read_text().splitlines()) == 2
    code = (
        "from gpt import load_model, generate_text\n"
        "model, tokenizer = load_model('run/checkpoints/last.ckpt')\n"
        "print(len(generate_text(model, tokenizer, 'ab', 5)))"
    )
    assert run(python, "-c", code, cwd=tmp_path).stdout.strip().isdigit()
