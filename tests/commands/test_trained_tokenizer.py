"""data.tokenizer=train as a user runs it: prepare.py trains and reports, train.py reuses the prepared
data, and the checkpoint alone (copied to a folder without the corpus or its cache: another machine)
generates, evaluates, exports for transformers and starts a fine-tuning run."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from gpt.generate.text import generate_text
from gpt.runs.checkpoint import load_model
from tests.helpers import assert_ok, run_forked, write_corpus

pytestmark = pytest.mark.xdist_group(__name__)

TOKENIZER = ("data=text", "data.tokenizer=train", "data.vocab_size=512")
MODEL = (
    "train.py",
    "experiment=tiny",
    "model.pos_emb=rope",  # rope + rmsnorm + swiglu: exported in Llama's format
    "data.val_windows=8",
    "trainer.max_steps=6",
    "~callbacks.progress_bar",
)
TRAIN = (*MODEL, *TOKENIZER)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> dict[str, Path]:
    """prepare.py, then train.py on the same corpus in `here`; the checkpoint copied to `there`,
    which has neither the corpus nor the prepared data."""
    here, there = tmp_path_factory.mktemp("here"), tmp_path_factory.mktemp("there")
    corpus = write_corpus(here / "corpus.txt")
    prepared = run_forked("prepare.py", *TOKENIZER, f"data.path={corpus}", cwd=here)
    assert_ok(prepared)
    trained = run_forked(*TRAIN, f"data.path={corpus}", "hydra.run.dir=run", cwd=here)
    assert_ok(trained)
    shutil.copy(here / "run" / "checkpoints" / "last.ckpt", there / "model.ckpt")
    return {"here": here, "there": there, "prepare": prepared, "train": trained}


def test_prepare_trains_reports_and_train_reuses_it(work):
    lines = work["prepare"].stdout.strip().splitlines()
    assert re.fullmatch(
        r"trained a 512-token BPE \(gpt4 pattern\) on 0\.0 MB of the training split in \d+\.\d s; bytes per "
        r"token of the val split: \d\.\d\d \(vs r50k_base \d\.\d\d, \d\.\d\dx; cl100k_base not in tiktoken's "
        r"cache\)",
        lines[0],
    ), lines[0]
    assert re.match(
        r"prepared data/cache/corpus-bpe512-[0-9a-f]{16}: [\d,]+ train and [\d,]+ val tokens", lines[-1]
    )
    (cache,) = (work["here"] / "data" / "cache").iterdir()  # train.py found it prepared
    ckpt = torch.load(work["there"] / "model.ckpt", weights_only=True)
    saved = ckpt["hyper_parameters"]["tokenizer"]
    assert saved["kind"] == "bpe" and saved["name"] == "bpe512"
    assert saved == json.loads((cache / "meta.json").read_text())["tokenizer"]


def test_generate_from_the_checkpoint_alone(work):
    proc = run_forked(
        "generate.py",
        "ckpt=model.ckpt",
        "prompt=ROMEO:",
        "max_new_tokens=20",
        "temperature=0",
        cwd=work["there"],
    )
    assert_ok(proc)
    model, tok = load_model(work["there"] / "model.ckpt")
    assert proc.stdout == "ROMEO:" + generate_text(model, tok, "ROMEO:", 20, temperature=0) + "\n"


@pytest.mark.slow
def test_evaluate_bpb_on_another_corpus_from_the_checkpoint_alone(work, tmp_path):
    other = write_corpus(tmp_path / "other.txt")
    proc = run_forked(
        "evaluate.py", "ckpt=model.ckpt", "task=bpb", "data=text", f"data.path={other}", cwd=work["there"]
    )
    assert_ok(proc)
    assert re.search(r"\bbpb\b.*\d\.\d{4}", proc.stdout), proc.stdout


def test_export_for_transformers_from_the_checkpoint_alone(work, shakespeare_text):
    transformers = pytest.importorskip("transformers")
    proc = run_forked("export.py", "ckpt=model.ckpt", "out=exported", cwd=work["there"])
    assert_ok(proc)
    _, tok = load_model(work["there"] / "model.ckpt")
    theirs = transformers.AutoTokenizer.from_pretrained(work["there"] / "exported")
    text = shakespeare_text[-10_000:]
    assert theirs.encode(text) == tok.encode(text)


@pytest.mark.slow
def test_init_from_keeps_the_checkpoints_tokenizer(work, tmp_path):
    """A run started from the checkpoint on another corpus tokenizes it with the checkpoint's BPE
    (data.tokenizer=train names it; it is not trained again on the new corpus)."""
    (tmp_path / "new.txt").write_text(write_corpus(tmp_path / "c.txt").read_text()[::-1], encoding="utf-8")
    proc = run_forked(
        *TRAIN,
        f"data.path={tmp_path / 'new.txt'}",
        f"init_from={work['there'] / 'model.ckpt'}",
        "trainer.max_steps=1",
        "hydra.run.dir=run",
        cwd=tmp_path,
    )
    assert_ok(proc)
    assert f"initialized from {work['there'] / 'model.ckpt'}" in proc.stdout
    saved = torch.load(work["there"] / "model.ckpt", weights_only=True)["hyper_parameters"]["tokenizer"]
    new = torch.load(tmp_path / "run/checkpoints/last.ckpt", weights_only=True)["hyper_parameters"][
        "tokenizer"
    ]
    assert new == saved
    refused = run_forked(
        *MODEL,
        "data=text",
        "data.tokenizer=char",
        f"data.path={tmp_path / 'new.txt'}",
        f"init_from={work['there'] / 'model.ckpt'}",
        cwd=tmp_path,
    )
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines()[-1] == (
        f"error: data.tokenizer=char but init_from={work['there'] / 'model.ckpt'} was trained with a BPE "
        "trained on its corpus (bpe512); set data.tokenizer=train"
    )


@pytest.mark.slow
def test_pairs_fine_tune_from_the_checkpoint_with_its_tokenizer(work, tmp_path):
    rows = [{"prompt": f"{i} + {i}", "completion": f" = {2 * i}"} for i in range(40)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = run_forked(
        *MODEL,
        "data=pairs",
        f"data.path={tmp_path / 'pairs.jsonl'}",
        f"init_from={work['there'] / 'model.ckpt'}",
        "trainer.max_steps=1",
        "hydra.run.dir=run",
        cwd=tmp_path,
    )
    assert_ok(proc)
    model, tok = load_model(tmp_path / "run")
    assert tok.to_dict()["name"] == "bpe512" and tok.eot_token == 511
    assert model.config.vocab_size == 512  # no token added: the BPE has its end-of-text token
