"""Fine-tuning on prompt -> completion pairs through the commands: train.py data=pairs, then
generate.py and evaluate.py on its checkpoint; the same step however it is split (batch size,
accumulation, 2-process DDP); a SIGKILL and the same command again; init_from a character run.
Bad input with data=pairs: tests/commands/test_bad_input.py. The pieces on their own:
tests/data/test_pairs.py, tests/train/test_lit_module.py, tests/train/test_init_from.py."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from gpt.config import DataConfig
from gpt.data.pairs import data_format
from gpt.data.pairs_datamodule import IGNORE, PackedRows
from gpt.generate.command import sample
from gpt.model.transformer import GPT
from gpt.runs.metrics import read_metrics
from gpt.tokenizer import CharTokenizer, tokenizer_from_dict
from tests.commands.pairs_runs import (
    EXTRA,
    PAIRS,
    STEPS,
    TEMPLATE,
    answered_ok,
    assert_equals_straight,
    pairs_cmd,
)
from tests.helpers import (
    assert_ok,
    assert_same_weights,
    build_in_process,
    final_state,
    fit,
    generate_config,
    kill_then_resume,
    losses,
    run_forked,
    write_rows,
)

# Its tests share costly module fixtures: one xdist worker runs them all, the fixtures once.
pytestmark = pytest.mark.xdist_group(__name__)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """One uninterrupted train.py data=pairs run: returns its folder (run/, train.jsonl, test.jsonl)."""
    work = tmp_path_factory.mktemp("pairs")
    write_rows(work / "train.jsonl", answered_ok(300, seed=0))
    write_rows(work / "test.jsonl", answered_ok(20, seed=1))
    proc = run_forked(*pairs_cmd(work / "train.jsonl", work / "run", *EXTRA), cwd=work)
    assert_ok(proc)
    assert "pairs: 270 training and 30 validation examples" in proc.stdout + proc.stderr
    return work


def test_train_saves_the_template_and_generate_writes_prompts_with_it_and_stops_at_eot(trained, monkeypatch):
    ckpt = torch.load(trained / "run/checkpoints/last.ckpt", weights_only=True)
    assert ckpt["global_step"] == STEPS
    fmt = ckpt["hyper_parameters"]["data_format"]
    assert fmt == data_format(DataConfig(source="pairs", path="x", template=TEMPLATE))
    assert fmt["template"] == TEMPLATE and fmt["prompt"] == "Q: {prompt}\nA: "
    tokenizer = tokenizer_from_dict(ckpt["hyper_parameters"]["tokenizer"])
    assert tokenizer.eot_token == tokenizer.vocab_size - 1

    # Greedy: the run's template writes the prompt; "ok" and then the end-of-text token, where
    # generation stops, 18 of the 20 new tokens unused (the final line break is generate.py's).
    common = ["generate.py", "ckpt=run", "prompt=12345", "max_new_tokens=20", "temperature=0"]
    templated = run_forked(*common, cwd=trained)
    assert_ok(templated)
    assert templated.stdout == "Q: 12345\nA: ok\n"
    assert "template: the checkpoint's" in templated.stderr

    plain = run_forked(*common, "template=none", cwd=trained)
    assert_ok(plain)
    assert plain.stdout.startswith("12345") and not plain.stdout.startswith("Q: ")
    assert "template:" not in plain.stderr

    # What the model does after end-of-text is untrained (here: end-of-text again, which decodes to
    # nothing), so the text alone would not show a generation that went on: count the forward passes
    # of what generate.py runs. The prefill gives "o", "o" gives "k", "k" gives end-of-text: 3 of 20.
    forward, calls = GPT.forward, []
    monkeypatch.setattr(GPT, "forward", lambda self, *a, **kw: calls.append(1) or forward(self, *a, **kw))
    cfg = generate_config(ckpt=str(trained / "run"), prompt="12345", max_new_tokens=20, temperature=0.0)
    assert sample(cfg, write=lambda _: None) == ["ok"]
    assert len(calls) == 3


def test_evaluate_writes_prompts_with_the_run_template(trained):
    proc = run_forked("evaluate.py", "ckpt=run", "data.path=test.jsonl", "limit=5", cwd=trained)
    assert_ok(proc)
    table = [line.split() for line in proc.stdout.strip().splitlines()]
    assert table[0] == ["metric", "greedy"]
    assert [row[0] for row in table[1:]] == ["exact_match", "token_accuracy", "chrf", "bleu"]
    assert float(table[1][1]) == 100.0  # every answer "ok", ended by end-of-text
    outputs = [
        json.loads(line) for line in (trained / "run/evals/generate-test.jsonl").read_text().splitlines()
    ]
    rows = [json.loads(line) for line in (trained / "test.jsonl").read_text().splitlines()[:5]]
    assert [o["prompt"] for o in outputs] == [f"Q: {r['prompt']}\nA: " for r in rows]
    assert [(o["reference"], o["greedy"], o["greedy_match"]) for o in outputs] == [("ok", "ok", True)] * 5
    summary = json.loads((trained / "run/evals/generate-test.json").read_text())
    assert summary["examples"] == 5 and summary["template"] == f"{TEMPLATE} (the checkpoint's)"
    assert summary["metrics"]["greedy/exact_match"] == 100.0


# ----------------------------------------------------------------------------- SIGKILL and resume


def test_sigkill_then_the_same_command_ends_bit_identical(trained, tmp_path):
    run = tmp_path / "killed"
    kill_then_resume(pairs_cmd(trained / "train.jsonl", run, *EXTRA), run, tmp_path, 10, STEPS)
    assert_equals_straight(run, trained / "run")
    assert len(list((run / "csv").glob("version_*"))) == 2


@pytest.mark.slow
def test_sigkill_then_the_same_command_ends_bit_identical_without_packing(trained, tmp_path):
    args = [*EXTRA, "data.packing=false"]
    assert_ok(run_forked(*pairs_cmd(trained / "train.jsonl", tmp_path / "straight", *args), cwd=tmp_path))
    run = tmp_path / "killed"
    kill_then_resume(pairs_cmd(trained / "train.jsonl", run, *args), run, tmp_path, 10, STEPS)
    assert_equals_straight(run, tmp_path / "straight")
    with pytest.raises(AssertionError):  # packing changed the run
        assert_same_weights(final_state(run), final_state(trained / "run"))


# ----------------------------------------------------------------------------- the split of a step


def uneven(n: int, seed: int) -> list[dict[str, str]]:
    """Prompts of 1, 2, 18 or 20 letters and completions of 1 to 8: with the prompts masked, rows
    (and so micro-batches and ranks) hold very different numbers of counted targets."""
    rng = random.Random(seed)
    return [
        {
            "prompt": "".join(rng.choices("abcdefghij", k=rng.choice([1, 2, 18, 20]))),
            "completion": "".join(rng.choices("abcdefghij", k=rng.randint(1, 8))),
        }
        for _ in range(n)
    ]


def logged(run: Path, name: str) -> dict[int, float]:
    return {int(r["step"]): r[name] for r in read_metrics(run) if name in r}


def test_the_step_is_the_same_however_it_is_split(tmp_path):
    path = write_rows(tmp_path / "uneven.jsonl", uneven(120, seed=1))
    common = ["trainer.max_steps=6", "model.dropout=0.0", "trainer.accelerator=cpu"]
    base = [*PAIRS, f"data.cache_dir={tmp_path / 'cache'}"]
    one_run = build_in_process(path, tmp_path / "one", *common, "data.batch_size=4", base=base)
    trainer, module, datamodule = one_run
    trainer.fit(module, datamodule=datamodule)
    one = module.model.state_dict()
    accumulated = fit(
        path, tmp_path / "acc", *common, "data.batch_size=2", "trainer.accumulate_grad_batches=2", base=base
    ).model.state_dict()
    ddp = ["trainer.devices=2", "trainer.strategy=ddp", "data.batch_size=2"]
    assert_ok(run_forked(*pairs_cmd(path, tmp_path / "ddp", *common, *ddp), cwd=tmp_path, timeout=600))

    # The split matters: the 4 rows of a step hold different numbers of counted targets, so the
    # halves that the micro-batches (rows 0-1, 2-3) or the ranks (rows 0 and 2, 1 and 3) see differ.
    rows = PackedRows(datamodule.train_examples, datamodule.train_packing, 32, True, step_items=4)
    counted = [int((rows[g]["targets"] != IGNORE).sum()) for g in range(4 * 6)]
    steps = [counted[4 * s : 4 * s + 4] for s in range(6)]
    assert sum(a + b != c + d for a, b, c, d in steps) >= 4, steps
    assert sum(a + c != b + d for a, b, c, d in steps) >= 4, steps

    # fp32 sums in another order (two micro-batches' gradients added, or all-reduced and halved,
    # against one batch's): about 1e-7 relative, which Adam's normalisation magnifies where second
    # moments are tiny: 6 steps end under 1e-6 apart, and the logged values about 2e-7 (relative).
    assert_same_weights(accumulated, one, atol=1e-5)
    assert_same_weights({f"model.{k}": v for k, v in one.items()}, final_state(tmp_path / "ddp"), atol=1e-5)
    # Adam's first steps hardly depend on the gradients' size, so the logged loss and gradient norm
    # (after accumulation and the all-reduce) are the sharper check.
    for name in ("train/loss", "train/grad_norm"):
        expected = logged(tmp_path / "one", name)
        assert sorted(expected) == list(range(6))
        for other in ("acc", "ddp"):
            found = logged(tmp_path / other, name)
            assert found.keys() == expected.keys()
            for step, value in expected.items():
                assert found[step] == pytest.approx(value, rel=1e-5), (name, other, step)


# ----------------------------------------------------------------------------- init_from a character run


def test_fine_tune_a_character_run_on_pairs(tmp_path):
    """A character model pretrained on text that holds the pairs' characters, then fine-tuned on the
    pairs: a new run from step 0, one more token (end-of-text, its row the mean of the others).
    optim.lr=1e-30 leaves the weights as they were loaded, so the final checkpoint shows them."""
    rows = answered_ok(100, seed=2)
    pairs = write_rows(tmp_path / "train.jsonl", rows)
    text = "".join(f"Q: {r['prompt']}\nA: {r['completion']}\n" for r in rows)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(text * (40_000 // len(text) + 1), encoding="utf-8")
    fit(corpus, tmp_path / "pre", "trainer.max_steps=4", "model.n_embd=32")
    pre = torch.load(tmp_path / "pre/checkpoints/last.ckpt", weights_only=True)
    assert pre["global_step"] == 4
    old_tokenizer = tokenizer_from_dict(pre["hyper_parameters"]["tokenizer"])
    assert old_tokenizer.eot_token is None
    vocab = old_tokenizer.vocab_size

    run = tmp_path / "tuned"
    proc = run_forked(
        *pairs_cmd(pairs, run, f"init_from={tmp_path / 'pre'}", "trainer.max_steps=2", "optim.lr=1e-30"),
        cwd=tmp_path,
    )
    assert_ok(proc)
    assert f"added an end-of-text token: vocab_size {vocab} -> {vocab + 1}" in proc.stdout + proc.stderr
    tuned = torch.load(run / "checkpoints/last.ckpt", weights_only=True)
    assert tuned["global_step"] == 2 and sorted(losses(run)) == [0, 1]  # from step 0, not 4
    hp = tuned["hyper_parameters"]
    assert hp["model"] == pre["hyper_parameters"]["model"] | {"vocab_size": vocab + 1, "dropout": 0.1}
    tokenizer = tokenizer_from_dict(hp["tokenizer"])
    assert isinstance(tokenizer, CharTokenizer) and tokenizer.chars == old_tokenizer.chars
    assert tokenizer.eot_token == vocab
    assert hp["data_format"]["template"] == TEMPLATE

    old, new = pre["state_dict"], tuned["state_dict"]
    assert old.keys() == new.keys()
    for key in old:
        if key in ("model.wte.weight", "model.lm_head.weight"):  # one tied tensor
            assert torch.equal(new[key][:vocab], old[key]), key
            assert torch.equal(new[key][vocab], old[key].float().mean(0)), key
        else:
            assert torch.equal(new[key], old[key]), key
