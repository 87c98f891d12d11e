"""The layering of docs/architecture.md, checked on the source: imports point one way, the library
imports no Hydra and never reaches into the checkout, and the inference side imports no Lightning."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
# Lowest first: a module may import its own layer and the layers before it, never one after it.
LAYERS = ["base", "model", "data", "interop", "runs", "generate", "evaluate", "serve", "train"]
BASE = {"errors", "config", "tokenizer", "bpe", "templates"}
# The public API re-exports from the layers.
EXEMPT = {"gpt"}
# Entry points in the package, like the root scripts: they compose a Hydra config and call the library.
ENTRIES = {"gpt.evaluate.__main__"}
# generate.py, evaluate.py, serve.py and load_model start fast
NO_LIGHTNING = {"model", "generate", "interop", "runs", "evaluate", "serve"}


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted((ROOT / "gpt").rglob("*.py")):
        found[".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")] = path
    return found


def layer(module: str) -> str:
    part = module.split(".")[1]
    return "base" if part in BASE else part


def imports(path: Path) -> list[str]:
    """Every module imported anywhere in the file, function bodies included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from gpt.train import precision` (a package) imports the module gpt.train.precision
            package = (ROOT / node.module.replace(".", "/")).is_dir()
            found += [f"{node.module}.{a.name}" if package else node.module for a in node.names]
    return found


def upward(name: str, path: Path) -> list[str]:
    mine = LAYERS.index(layer(name))
    return [
        m for m in imports(path) if m.startswith("gpt.") and m not in EXEMPT and LAYERS.index(layer(m)) > mine
    ]


ALL = modules()
LIBRARY = {name: path for name, path in ALL.items() if name not in EXEMPT}


def test_every_module_is_in_a_layer():
    assert {layer(name) for name in LIBRARY} == set(LAYERS)


def test_imports_point_down():
    wrong = {name: upward(name, path) for name, path in LIBRARY.items() if upward(name, path)}
    assert not wrong, f"imports of a higher layer: {wrong}"


def test_an_upward_import_is_seen(tmp_path):
    path = tmp_path / "kv_cache.py"
    path.write_text("from gpt import config\n\ndef f():\n    from gpt.train import optim\n")
    assert upward("gpt.model.kv_cache", path) == ["gpt.train.optim"]


def reached(start: set[str]) -> set[str]:
    """The gpt modules that importing `start` loads, directly or through another gpt module."""
    seen, todo = set(), list(start)
    while todo:
        name = todo.pop()
        if name in seen or name not in ALL:
            continue
        seen.add(name)
        todo += [m for m in imports(ALL[name]) if m.startswith("gpt.")]
        # importing gpt.a.b runs gpt/__init__.py and gpt/a/__init__.py first
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]
    return seen


def test_nothing_on_the_generate_path_imports_data():
    # generate.py and load_model need the checkpoint and its template, not data preparation.
    start = {name for name in LIBRARY if layer(name) in ("generate", "runs")}
    wrong = sorted(name for name in reached(start) if name.split(".")[1:2] == ["data"])
    assert not wrong, f"the generate path loads {wrong}"


def test_a_data_import_on_the_generate_path_is_seen():
    assert "gpt.data.pairs" in reached({"gpt.evaluate.examples"})


def roots(path: Path) -> set[str]:
    return {m.split(".")[0] for m in imports(path)}


def test_library_imports_no_hydra():
    wrong = [
        name for name, path in ALL.items() if name not in ENTRIES and roots(path) & {"hydra", "omegaconf"}
    ]
    assert not wrong, f"Hydra belongs to the root scripts, not {wrong}"


def test_library_does_not_reach_into_the_checkout():
    """No runpy of a root script, no path built from a module's own file: an installed package has no
    checkout around it."""
    reach = re.compile(r"__file__|parents\[")
    wrong = [n for n, path in ALL.items() if "runpy" in roots(path) or reach.search(path.read_text("utf-8"))]
    assert not wrong, f"these reach out of gpt/: {wrong}"


def test_the_wheel_lists_every_package():
    """pyproject.toml lists the packages (conf/ and its folders ship as gpt.conf): a new one must be
    added there."""
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "gpt").rglob("__init__.py")}
    conf_dirs = (d for d in (ROOT / "conf").rglob("*") if d.is_dir() and d.name != "__pycache__")
    folders = [ROOT / "conf", *conf_dirs]
    conf = {".".join(("gpt", *d.relative_to(ROOT).parts)) for d in folders}
    assert listed == found | conf


def test_inference_side_imports_no_lightning():
    lightning = {"lightning", "pytorch_lightning", "torchmetrics"}
    wrong = [n for n, path in LIBRARY.items() if layer(n) in NO_LIGHTNING and roots(path) & lightning]
    assert not wrong, f"these must start without Lightning: {wrong}"


def test_each_module_says_its_idea_first():
    docs = {
        name: ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) for name, path in ALL.items()
    }
    assert not [name for name, doc in docs.items() if not (doc and doc.strip())]
