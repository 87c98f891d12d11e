"""The old command forms, kept for one release: `python -m gpt.prepare|export|compare` and compare's
RUN_DIR... --out PLOT flags. Each prints exactly one deprecation line on stderr and otherwise the
same output as the new form (python prepare.py / export.py / compare.py key=value ...)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from compare import new_argv
from gpt.runs.checkpoint import save_weights_checkpoint
from gpt.tokenizer import CharTokenizer
from tests.helpers import run_forked, tiny_model


def deprecation_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "deprecated" in line]


def assert_same_as_new(old, new, note: str) -> None:
    """`old` printed one deprecation line (`note`), then what `new` printed, and both succeeded."""
    assert new.returncode == 0 and old.returncode == 0, old.stderr[-2000:] + new.stderr[-2000:]
    assert deprecation_lines(new.stderr) == []
    assert deprecation_lines(old.stderr) == [note]
    assert old.stdout == new.stdout
    assert old.stderr.splitlines() == [note, *new.stderr.splitlines()]


def test_python_m_gpt_prepare(tmp_path, tiny_corpus):
    args = ["data=text", f"data.path={tiny_corpus}", "data.tokenizer=char", f"data.cache_dir={tmp_path}/c"]
    first = run_forked("prepare.py", *args, cwd=tmp_path)  # prepares; the next two find it cached
    assert first.returncode == 0 and first.stdout.startswith("prepared "), first.stderr[-2000:]
    new = run_forked("prepare.py", *args, cwd=tmp_path)
    old = run_forked("-m", "gpt.prepare", *args, cwd=tmp_path)
    assert new.stdout.startswith("cached ")
    note = "note: python -m gpt.prepare is deprecated and goes in the next release; use python prepare.py"
    assert_same_as_new(old, new, note)


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_python_m_gpt_export(tmp_path):
    tokenizer = CharTokenizer("".join(chr(c) for c in range(40, 90)))
    ckpt = save_weights_checkpoint(tiny_model(pos_emb="rope"), tokenizer, tmp_path / "rope.ckpt")
    args = [f"ckpt={ckpt}", "out=exported", "dtype=bfloat16"]  # the same keys, old and new
    new = run_forked("export.py", *args, cwd=tmp_path)
    written = digests(tmp_path / "exported")
    old = run_forked("-m", "gpt.export", *args, cwd=tmp_path)
    note = "note: python -m gpt.export is deprecated and goes in the next release; use python export.py"
    assert_same_as_new(old, new, note)
    assert new.stdout.startswith("wrote llama format") and digests(tmp_path / "exported") == written


def fake_run(folder: Path, n_layer: int) -> None:
    """What compare reads of a run dir: its config and its CSV log (no checkpoint)."""
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "config.yaml").write_text(f"model:\n  n_layer: {n_layer}\nseed: 1\n")
    (folder / "csv" / "version_0").mkdir(parents=True)
    rows = [
        "step,train/loss,train/tokens,train/time,val/loss",
        "0,4.0,256,1.0,",
        f"1,{3 - n_layer / 10},512,2.0,",
    ]
    rows.append(f"1,,,,{3.1 - n_layer / 10}")
    (folder / "csv" / "version_0" / "metrics.csv").write_text("\n".join(rows) + "\n")


COMPARE_NEW = ("compare.py", "runs=[sweep/0,sweep/1]", "out=plots/p.png")
OLD_FLAGS = "RUN_DIR... --out PLOT is deprecated and goes in the next release; use python compare.py"


@pytest.mark.parametrize(
    "old, note",
    [
        (
            ("-m", "gpt.compare", "runs=[sweep/0,sweep/1]", "out=plots/p.png"),
            "note: python -m gpt.compare is deprecated and goes in the next release; use python compare.py",
        ),
        (
            ("compare.py", "sweep/0", "sweep/1", "--out", "plots/p.png"),
            f"note: python compare.py {OLD_FLAGS} runs=[DIR,...] out=PLOT",
        ),
        (
            ("-m", "gpt.compare", "sweep/0", "sweep/1", "--out=plots/p.png"),
            f"note: python -m gpt.compare {OLD_FLAGS} runs=[DIR,...] out=PLOT",
        ),
    ],
    ids=["python-m-gpt-compare", "old-flags", "python-m-gpt-compare-with-old-flags"],
)
def test_old_compare_forms(tmp_path, old, note):
    for run in (0, 1):
        fake_run(tmp_path / "sweep" / str(run), n_layer=run + 1)
    new = run_forked(*COMPARE_NEW, cwd=tmp_path)
    plot = (tmp_path / "plots" / "p.png").read_bytes()
    (tmp_path / "plots" / "p.png").unlink()
    assert_same_as_new(run_forked(*old, cwd=tmp_path), new, note)
    assert new.stdout.splitlines()[2].split()[:2] == ["0", "1"]  # run 0, model.n_layer=1
    assert (tmp_path / "plots" / "p.png").read_bytes() == plot and plot.startswith(b"\x89PNG")


NOTE = f"note: python compare.py {OLD_FLAGS} runs=[DIR,...] out=PLOT"


@pytest.mark.parametrize(
    "argv, expected, note",
    [
        # the new form, Hydra's flags and their values pass as they are
        (["runs=[a,b]", "out=p.png"], ["runs=[a,b]", "out=p.png"], None),
        (["runs=x/*", "--cfg", "job", "-m"], ["runs=x/*", "--cfg", "job", "-m"], None),
        (
            ["--info", "searchpath", "hydra/job_logging=none"],
            ["--info", "searchpath", "hydra/job_logging=none"],
            None,
        ),
        ([], [], None),
        # run dirs and globs, then --out PLOT or --out=PLOT anywhere
        (["runs/a", "runs/b/*"], ["runs=['runs/a','runs/b/*']"], NOTE),
        (["--out", "p.png", "runs/a"], ["runs=['runs/a']", "out='p.png'"], NOTE),
        (["runs/a", "--out=~/p.png"], ["runs=['runs/a']", "out='~/p.png'"], NOTE),
        (["runs=[a]", "--out", "p.png"], ["runs=[a]", "out='p.png'"], NOTE),
        # paths Hydra could not parse unquoted: a space, a quote, a comma, a `~`, an `=` (a sweep's dir names)
        (["my runs/it's,1"], ["runs=['my runs/it\\'s,1']"], NOTE),
        (["~/runs/a", "sweep/lr=0.1"], ["runs=['~/runs/a','sweep/lr=0.1']"], NOTE),
        # a key=value that is no path stays an override (and a typo gets Hydra's message)
        (["runs/a", "outt=p.png"], ["outt=p.png", "runs=['runs/a']"], NOTE),
    ],
)
def test_old_compare_flags_become_overrides(argv, expected, note):
    assert new_argv(argv) == (expected, note)


def test_python_m_gpt_compare_gets_one_note_for_its_name_and_its_old_flags():
    command = "python -m gpt.compare"
    assert new_argv(["runs=[a]"], command) == (
        ["runs=[a]"],
        "note: python -m gpt.compare is deprecated and goes in the next release; use python compare.py",
    )
    assert new_argv(["a", "--out", "p.png"], command)[1] == NOTE.replace("python compare.py", command, 1)


def test_translated_flags_parse_back_to_the_same_paths():
    from hydra.core.override_parser.overrides_parser import OverridesParser

    runs = ["my runs/it's,1", "~/runs/*", "sweep/lr=0.1", "[x]"]
    argv, _ = new_argv([*runs, "--out", "a b.png"])
    parsed = [OverridesParser.create().parse_override(arg).value() for arg in argv]
    assert parsed == [runs, "a b.png"]
