"""Multiple-choice scores as lm-evaluation-harness computes them: a small random-weight GPT-2-shaped
model is exported as a Hugging Face dir, the harness (its hf model, its own HellaSwag task and a plain
multiple_choice task) scores the fixtures offline in a subprocess, and score_choices on the same
files with the model loaded back from that dir must agree example by example."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gpt.evaluate.choice import TARGET_DELIMITER, read_choices, read_hellaswag, score_choices
from gpt.evaluate.likelihood import encode_pair
from gpt.interop.export import export
from gpt.runs.checkpoint import load_model
from gpt.tokenizer import TiktokenTokenizer
from tests.helpers import tiny_model

# Its tests share costly module fixtures: one xdist worker runs them all, the fixtures once.
pytestmark = pytest.mark.xdist_group(__name__)

lm_eval = pytest.importorskip("lm_eval")

FIXTURES = Path(__file__).parent / "fixtures"
HELLASWAG = FIXTURES / "hellaswag_mini.jsonl"
MC = FIXTURES / "mc_mini.jsonl"
BLOCK_SIZE = 64  # small enough that the longest HellaSwag fixture example is left-truncated
ATOL = 1e-4

# The harness's HellaSwag task (its process_docs, its prompt) on the fixture instead of the Hub's copy.
HELLASWAG_TASK = """\
include: {harness}/tasks/hellaswag/hellaswag.yaml
task: hellaswag_fixture
dataset_path: json
dataset_name: null
dataset_kwargs:
  data_files:
    validation: {path}
training_split: null
validation_split: validation
"""
MC_TASK = """\
task: mc_fixture
dataset_path: json
dataset_name: null
dataset_kwargs:
  data_files:
    validation: {path}
validation_split: validation
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""
# Run in a subprocess: datasets reads HF_DATASETS_OFFLINE when imported, and the harness configures
# logging for the whole process. include_defaults=False: only the two fixture tasks are indexed, not
# the harness's 14,000 (18 s of a 2-core machine); hellaswag_fixture includes the harness's
# hellaswag.yaml by its path, which needs no index.
RUN_HARNESS = """\
import json, sys
import lm_eval
from lm_eval.tasks import TaskManager

model_dir, task_dir, out = sys.argv[1:4]
tasks = ["hellaswag_fixture", "mc_fixture"]
res = lm_eval.simple_evaluate(
    model="hf", model_args=f"pretrained={model_dir},dtype=float32", tasks=tasks,
    task_manager=TaskManager(include_path=task_dir, include_defaults=False),
    log_samples=True, batch_size=4, device="cpu",
)
dump = {
    task: {
        "results": res["results"][task],
        "samples": [
            {"doc_id": s["doc_id"], "doc": s["doc"], "resps": s["filtered_resps"], "acc": s["acc"],
             "acc_norm": s["acc_norm"]}
            for s in sorted(res["samples"][task], key=lambda s: s["doc_id"])
        ],
    }
    for task in tasks
}
with open(out, "w") as f:
    json.dump(dump, f, default=float)
"""


def randomize(model: torch.nn.Module, seed: int = 0, scale: float = 0.3) -> None:
    """Random values in every parameter (biases and norm weights included), so that the choices'
    log-likelihoods differ and a misplaced weight or token would show."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * scale)


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """A GPT-2-shaped model with random weights and r50k_base, exported as a Hugging Face dir."""
    model = tiny_model(
        vocab_size=50257, block_size=BLOCK_SIZE, pos_emb="learned", norm="layernorm", ffn="gelu", bias=True
    )
    randomize(model)
    out = tmp_path_factory.mktemp("hf")
    export(model, TiktokenTokenizer("r50k_base"), out)
    return out


@pytest.fixture(scope="module")
def harness(exported, tmp_path_factory) -> dict:
    """What the harness reports for both fixtures: per task, its results and its samples."""
    tmp = tmp_path_factory.mktemp("harness")
    tasks = tmp / "tasks"
    tasks.mkdir()
    harness_dir = Path(lm_eval.__file__).parent
    (tasks / "hellaswag_fixture.yaml").write_text(HELLASWAG_TASK.format(harness=harness_dir, path=HELLASWAG))
    (tasks / "mc_fixture.yaml").write_text(MC_TASK.format(path=MC))
    (tmp / "run.py").write_text(RUN_HARNESS)
    env = os.environ | {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp / "hf")}
    proc = subprocess.run(
        [sys.executable, "run.py", str(exported), str(tasks), "out.json"],
        cwd=tmp,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((tmp / "out.json").read_text())


@pytest.fixture(scope="module")
def ours(exported):
    return load_model(exported)


def compare(theirs: dict, records: list[dict]) -> float:
    """Checks every example against the harness's; returns the largest log-likelihood difference."""
    samples = theirs["samples"]
    largest = 0.0
    assert len(samples) == len(records)
    for sample, record in zip(samples, records, strict=True):
        their_lls = np.array([ll for ll, _ in sample["resps"]])
        their_lengths = np.array([len(c) for c in sample["doc"]["choices"]], dtype=float)
        assert record["loglikelihoods"] == pytest.approx(their_lls, abs=ATOL), record["where"]
        largest = max(largest, float(np.abs(np.array(record["loglikelihoods"]) - their_lls).max()))
        # The harness's own rules (lm_eval/api/task.py, process_results) on its log-likelihoods.
        their_preds = (np.argmax(their_lls), np.argmax(their_lls / their_lengths))
        assert (record["pred"], record["pred_norm"]) == their_preds, record["where"]
        assert (record["acc"], record["acc_norm"]) == (sample["acc"], sample["acc_norm"]), record["where"]
    # The random model must tell the choices apart, or agreeing would prove little.
    assert all(len(set(r["loglikelihoods"])) == len(r["choices"]) for r in records)
    n = len(records)
    assert theirs["results"]["acc,none"] == pytest.approx(sum(r["acc"] for r in records) / n)
    assert theirs["results"]["acc_norm,none"] == pytest.approx(sum(r["acc_norm"] for r in records) / n)
    return largest


def test_hellaswag_agrees_with_the_harness(harness, ours, record_property):
    model, tokenizer = ours
    examples = read_hellaswag(HELLASWAG)
    theirs = harness["hellaswag_fixture"]
    # The harness's own preprocessing of the same rows gives our contexts and choices.
    for ex, sample in zip(examples, theirs["samples"], strict=True):
        assert (ex.context, list(ex.choices), ex.label) == (
            sample["doc"]["query"],
            sample["doc"]["choices"],
            sample["doc"]["gold"],
        )
    longest = max(
        sum(map(len, encode_pair(tokenizer, ex.context, TARGET_DELIMITER + c)))
        for ex in examples
        for c in ex.choices
    )
    assert longest > BLOCK_SIZE + 1  # some request is left-truncated
    # in the JUnit report (pytest --junitxml): how close the agreement is
    record_property(
        "max_loglikelihood_difference", compare(theirs, score_choices(model, tokenizer, examples, 3))
    )


def test_mc_agrees_with_the_harness(harness, ours, record_property):
    model, tokenizer = ours
    records = score_choices(model, tokenizer, read_choices(MC), batch_size=5)
    record_property("max_loglikelihood_difference", compare(harness["mc_fixture"], records))
    # acc and acc_norm differ on some example, so both rules are checked.
    assert any(r["pred"] != r["pred_norm"] for r in records)
