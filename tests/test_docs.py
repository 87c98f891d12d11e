"""The documentation is tested like code (conventions in docs/README.md):

- docs/configuration.md's reference is what scripts/config_reference.py writes;
- the README's quickstart commands (run by CI) are the ones documented;
- every relative link and #anchor between the pages resolves;
- every command in a ```bash block of README.md and docs/*.md runs, with tiny settings added, in a
  temporary folder holding the example run `runs/2026-11-21/14-06-53`; or is skipped, with the
  reason (a network, a GPU, several devices, the reader's own files, a benchmark); or is marked slow
  (training runs, sweeps, minutes of tokenizing: `python -m pytest -m slow tests/test_docs.py`).
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import ROOT, assert_ok, run_forked

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
QUICKSTART = [
    "pip install torch --index-url https://download.pytorch.org/whl/cpu"
    " && pip install -e . && python train.py",
    'pip install -e ".[dev]" && python -m pytest',
]
# The run the examples refer to (runs/2026-11-21/14-06-53): a tiny model that every command can load
# and export (rotary positions: the Llama format).
EXAMPLE_RUN = "runs/2026-11-21/14-06-53"
TINY_MODEL = {"model.n_layer": "1", "model.n_head": "2", "model.n_embd": "32", "model.block_size": "32"}
TINY_TRAIN = TINY_MODEL | {
    "trainer.max_steps": "2",
    "trainer.val_check_interval": "2",
    "data.val_windows": "2",
    "data.batch_size": "2",
    "callbacks.samples.every_n_steps": "0",
}
TINY_GENERATE = {"max_new_tokens": "8"}
TINY_EVALUATE = {"limit": "4", "max_new_tokens": "8"}
# The runs that the worked examples of docs/finetuning.md and the README train, a command above
# the ones that use them.
WORKED_RUNS = re.compile(r"\bruns/(numbers|dialogue|shakespeare)\b")


# ---------------------------------------------------------------------------------------------
# Extraction


@dataclass(frozen=True)
class DocCommand:
    where: str  # README.md:42
    text: str  # the command, continuation lines joined, the comment removed
    setup: tuple[str, ...] = ()  # `NAME=$(...)` lines above it in the same block


def strip_comment(line: str) -> str:
    """The line without a trailing `# comment` (a `#` outside quotes, after a space)."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def fenced_blocks(text: str) -> list[tuple[str, int, list[str]]]:
    """(language, line number of the first line, lines) of each fenced block."""
    blocks, lang, start, body = [], None, 0, []
    for number, line in enumerate(text.splitlines(), 1):
        fence = re.match(r"^\s*```(\S*)", line)
        if fence and lang is None:
            lang, start, body = fence.group(1), number + 1, []
        elif fence:
            blocks.append((lang, start, body))
            lang = None
        elif lang is not None:
            body.append(line)
    return blocks


def doc_commands(path: Path) -> list[DocCommand]:
    name = path.relative_to(ROOT).as_posix()
    out = []
    for lang, start, body in fenced_blocks(path.read_text(encoding="utf-8")):
        if lang != "bash":
            continue
        setup: list[str] = []
        pending, first = "", 0
        for offset, raw in enumerate(body):
            line = raw.rstrip()
            if not pending:
                first = start + offset
            if line.endswith("\\"):
                pending += line[:-1].strip() + " "
                continue
            command = strip_comment(pending + line.strip()).strip()
            pending = ""
            if not command:
                continue
            if re.match(r"^[A-Z_]+=\$\(", command):  # STDLIB=$(...): used by the lines below
                setup.append(command)
                continue
            out.append(DocCommand(f"{name}:{first}", command, tuple(setup)))
    return out


def all_commands() -> list[DocCommand]:
    seen, out = set(), []
    for page in PAGES:
        for command in doc_commands(page):
            if command.text not in seen:  # a command shown on two pages runs once
                seen.add(command.text)
                out.append(command)
    return out


# ---------------------------------------------------------------------------------------------
# What runs, what is slow, what is skipped, and why

PLACEHOLDERS = ("path/to", "my_corpus", "notes/", "export.jsonl", "runs/other/")
HUB_MODELS = re.compile(r"init_from=gpt2(-medium|-large|-xl)?(\s|$)")


def plan(command: DocCommand) -> tuple[str, str]:
    """("run" | "slow" | "skip", reason)."""
    text = command.text
    script = re.search(r"\bpython (\S+\.py)", text)
    devices = re.search(r"trainer\.devices=(\d+)", text)
    if "pip install" in text:
        return "skip", "installs packages: needs a network (CI runs the quickstart)"
    if "sbatch" in text or "torchrun.sh" in text:
        return "skip", "needs a cluster: SLURM or torchrun on GPUs"
    if devices and int(devices.group(1)) > 1 and "trainer.accelerator=cpu" not in text:
        return "skip", f"needs {devices.group(1)} GPUs"
    if "trainer=fsdp" in text:
        return "skip", "FSDP needs GPUs"
    if HUB_MODELS.search(text) or "data=hf" in text:
        return "skip", "downloads from the Hugging Face Hub: needs a network"
    if "task=hellaswag" in text and "data.path=" not in text and "callbacks.evaluate.path=" not in text:
        return "skip", "downloads HellaSwag's validation set: needs a network"
    if any(p in text for p in PLACEHOLDERS):
        return "skip", "a placeholder path for the reader's own files"
    if script and script.group(1).startswith("bench/"):
        return "skip", "a benchmark: minutes on a quiet machine (run it yourself)"
    if script is None:
        return "skip", "not a command of this repository"
    if script.group(1) == "serve.py" and "--cfg" not in text:
        return "skip", "a server: it runs until stopped (tests/serve/ starts one and talks to it)"
    if "$STDLIB" in text or command.setup:
        return "slow", "the worked example on the standard library: minutes of tokenizing and training"
    if script.group(1) == "scripts/make_pairs.py":
        return "slow", "writes a worked example's data for the commands below it (-m slow: in order)"
    if WORKED_RUNS.search(text) and script.group(1) != "train.py":
        return "slow", "uses the run that the worked example trains above (run in order with -m slow)"
    if " -m " in f" {text} " and script.group(1) == "train.py":
        return "slow", "a sweep: several training runs"
    if devices and int(devices.group(1)) > 1:
        return "slow", "DDP on CPU processes"
    if script.group(1) == "train.py" and "--cfg" not in text:
        return "slow", "a training run (tiny, but seconds each)"
    return "run", ""


# ---------------------------------------------------------------------------------------------
# Running them


def set_overrides(text: str, overrides: dict[str, str]) -> str:
    for key, value in overrides.items():
        text = re.sub(rf"(?<!\S){re.escape(key)}=\S+", "", text)
        text = text.rstrip() + f" {key}={value}"
    return re.sub(r"  +", " ", text)


def runnable(command: DocCommand, number: int) -> str:
    """The shell script that runs the command cheaply from the temporary folder."""
    text = command.text
    script = re.search(r"\bpython (\S+\.py)", text).group(1)
    if script == "train.py" and "--cfg" not in text:
        # Pairs keep their rows: a 32-token row would cut a prompt before its completion starts.
        pairs = "data=pairs" in text
        text = set_overrides(
            text, {k: v for k, v in TINY_TRAIN.items() if not (pairs and k == "model.block_size")}
        )
        if "hydra.run.dir=" not in text and " -m " not in text:
            text += f" hydra.run.dir=runs/doc-{number}"
    elif script == "generate.py":
        text = set_overrides(text, TINY_GENERATE)
    elif script == "evaluate.py":
        text = set_overrides(text, TINY_EVALUATE)
    python = f'"{sys.executable}"'
    text = re.sub(r"\bpython (\S+\.py)", lambda m: f'{python} "{ROOT / m.group(1)}"', text)
    text = re.sub(r"\bpython -c\b", f"{python} -c", text)
    return "\n".join(["set -e", *command.setup, text]).replace("$(python ", f"$({python} ")


def env() -> dict[str, str]:
    return os.environ | {"PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline"}


def run_shell(script: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "-c", script],
        cwd=cwd,
        env=env(),
        stdin=subprocess.DEVNULL,  # interactive=true ends at once, as on Ctrl-D
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with the example run (and a copy of it, so that there are runs to compare) and a
    prompt file, where every documented command runs."""
    cwd = tmp_path_factory.mktemp("docs")
    overrides = [f"{k}={v}" for k, v in (TINY_TRAIN | {"model.pos_emb": "rope"}).items()]
    assert_ok(run_forked("train.py", *overrides, f"hydra.run.dir={EXAMPLE_RUN}", cwd=cwd))
    shutil.copytree(cwd / EXAMPLE_RUN, cwd / "runs/2026-11-21/15-30-00")
    (cwd / "prompts.txt").write_text("ROMEO:\nJULIET:\n", encoding="utf-8")
    return cwd


def command_params() -> list:
    params = []
    for command in all_commands():
        kind, reason = plan(command)
        marks = {"slow": [pytest.mark.slow], "skip": [pytest.mark.skip(reason=reason)]}.get(kind, [])
        params.append(pytest.param(command, id=f"{command.where} {command.text[:60]}", marks=marks))
    return params


@pytest.mark.xdist_group("documented-commands")  # one worker, one workdir
@pytest.mark.parametrize("command", command_params())
def test_documented_command_runs(command: DocCommand, workdir: Path) -> None:
    number = len(list(workdir.glob("runs/doc-*"))) + 1
    done = run_shell(runnable(command, number), workdir)
    assert done.returncode == 0, (
        f"{command.where}: `{command.text}` exited {done.returncode}\n"
        f"stdout: {done.stdout[-2000:]}\nstderr: {done.stderr[-2000:]}"
    )


# ---------------------------------------------------------------------------------------------
# The generated reference, the quickstart, the links


def load_config_reference():
    path = ROOT / "scripts" / "config_reference.py"
    spec = importlib.util.spec_from_file_location("config_reference", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_configuration_reference_is_up_to_date() -> None:
    reference = load_config_reference()
    doc = reference.DOC.read_text(encoding="utf-8")
    assert reference.BEGIN in doc and reference.END in doc, f"{reference.DOC} lost its generated part"
    assert reference.splice(doc, reference.render()) == doc, (
        f"docs/configuration.md is out of date with gpt/config.py or conf/: run {reference.RUN}"
    )


def test_configuration_reference_shows_the_dataclass_default_and_the_preset_value() -> None:
    """The README once said block_size defaults to 64 while the dataclass said 256: both are now
    read from the code, side by side (and ModelConfig's defaults are the default preset's, nano)."""
    from gpt.config import ModelConfig

    text = load_config_reference().render()
    row = next(line for line in text.splitlines() if line.startswith("| `model.block_size` | `int`"))
    assert f"`{ModelConfig().block_size}`" in row
    assert "`model=nano`" not in row  # the preset's value is the default: nothing to show beside it


def test_readme_quickstart_is_what_ci_runs() -> None:
    commands = [c.text for c in doc_commands(ROOT / "README.md")]
    assert commands[: len(QUICKSTART)] == QUICKSTART


def test_every_bash_command_is_classified() -> None:
    """A command the rules do not know is run, never silently skipped; a skip or slow mark always
    has a reason."""
    plans = [plan(c) for c in all_commands()]
    assert all(kind in ("run", "slow", "skip") and (kind == "run" or reason) for kind, reason in plans)
    assert sum(kind == "run" for kind, _ in plans) >= 10


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = path.read_text(encoding="utf-8")
    in_code = False
    out = set()
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            in_code = not in_code
        elif not in_code and (m := re.match(r"^#+ (.+)", line)):
            out.add(slug(m.group(1)))
    return out


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_links_resolve(page: Path) -> None:
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"^[a-z]+://", target):
            continue
        file, _, anchor = target.partition("#")
        path = (page.parent / file).resolve() if file else page
        missing_anchor = anchor and path.suffix == ".md" and anchor not in anchors(path)
        if not path.exists() or missing_anchor:
            broken.append(target)
    assert not broken, f"{page.relative_to(ROOT)}: broken links {broken}"
