"""model.arch=encoder_decoder through the commands: train.py on pairs, generate.py and evaluate.py
on its checkpoint alone (greedy and beam, stopping at end-of-text), a SIGKILL and the same command
again (bit-identical), the same step in one process and in 2-process DDP, bf16 autocast, init_from
between encoder-decoder runs, and the commands that refuse it with one line. The model on its own:
tests/model/test_encoder_decoder.py."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from gpt.generate.command import sample
from gpt.model.encoder_decoder import EncoderDecoder
from tests.commands.pairs_runs import (
    EXTRA,
    STEPS,
    answered_ok,
    assert_equals_straight,
    pairs_cmd,
)
from tests.helpers import (
    assert_ddp_equals_one,
    assert_ok,
    assert_same_weights,
    final_state,
    free_port,
    generate_config,
    kill_then_resume,
    losses,
    run_forked,
    write_rows,
)

pytestmark = pytest.mark.xdist_group(__name__)

SEQ2SEQ = ["model.arch=encoder_decoder", "model.n_layer=1", "model.n_enc_layer=1"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """One uninterrupted train.py run of an encoder-decoder on pairs: its folder (run/, the rows)."""
    work = tmp_path_factory.mktemp("seq2seq")
    write_rows(work / "train.jsonl", answered_ok(300, seed=0))
    write_rows(work / "test.jsonl", answered_ok(20, seed=1))
    proc = run_forked(*pairs_cmd(work / "train.jsonl", work / "run", *SEQ2SEQ, *EXTRA), cwd=work)
    assert_ok(proc)
    assert "EncoderDecoder" in proc.stdout + proc.stderr  # the model summary
    return work


def test_generate_answers_from_the_checkpoint_alone_and_stops_at_eot(trained, tmp_path, monkeypatch):
    ckpt = torch.load(trained / "run/checkpoints/last.ckpt", weights_only=True)
    model = ckpt["hyper_parameters"]["model"]
    assert (model["arch"], model["n_enc_layer"], ckpt["global_step"]) == ("encoder_decoder", 1, STEPS)
    assert model["decoder_start"] == model["vocab_size"] - 1  # the end-of-text token
    alone = tmp_path / "elsewhere" / "model.ckpt"  # the file alone, away from the run and its data
    alone.parent.mkdir()
    shutil.copy(trained / "run/checkpoints/last.ckpt", alone)
    common = ["generate.py", f"ckpt={alone}", "prompt=12345", "max_new_tokens=20", "temperature=0"]
    for extra in ([], ["num_beams=3"]):
        proc = run_forked(*common, *extra, cwd=alone.parent)
        assert_ok(proc)
        assert proc.stdout == "Q: 12345\nA: ok\n"
    # The source is encoded once; the decoder runs once per token: the start token gives "o", "o"
    # gives "k", "k" gives end-of-text, where generation stops (3 of 20).
    forward, calls = EncoderDecoder.forward, []
    monkeypatch.setattr(
        EncoderDecoder, "forward", lambda self, *a, **kw: calls.append(kw) or forward(self, *a, **kw)
    )
    encode, encoded = EncoderDecoder.encode_into, []
    monkeypatch.setattr(
        EncoderDecoder, "encode_into", lambda self, *a, **kw: encoded.append(1) or encode(self, *a, **kw)
    )
    cfg = generate_config(ckpt=str(alone), prompt="12345", max_new_tokens=20, temperature=0.0)
    assert sample(cfg, write=lambda _: None) == ["ok"]
    assert len(calls) == 3 and len(encoded) == 1
    assert all(kw.get("source") is None for kw in calls)  # the cache holds the encoded source


def test_evaluate_greedy_and_beam(trained):
    proc = run_forked(
        "evaluate.py", "ckpt=run", "data.path=test.jsonl", "methods=[greedy,beam]", "limit=10", cwd=trained
    )
    assert_ok(proc)
    table = [line.split() for line in proc.stdout.strip().splitlines()]
    assert table[0] == ["metric", "greedy", "beam"] and table[1] == ["exact_match", "100.00", "100.00"]


def test_sigkill_then_the_same_command_ends_bit_identical(trained, tmp_path):
    run = tmp_path / "killed"
    kill_then_resume(pairs_cmd(trained / "train.jsonl", run, *SEQ2SEQ, *EXTRA), run, tmp_path, 10, STEPS)
    assert_equals_straight(run, trained / "run")


@pytest.mark.slow
def test_ddp_on_two_processes_equals_one(trained, tmp_path):
    """The same 6 steps of 4 rows: one process, and 2 DDP ranks of 2 rows each."""
    common = [*SEQ2SEQ, "trainer.max_steps=6", "model.dropout=0.0", "trainer.accelerator=cpu"]
    path = trained / "train.jsonl"
    assert_ddp_equals_one(lambda run, *extra: pairs_cmd(path, run, *common, *extra), tmp_path, steps=6)


@pytest.mark.slow
def test_bf16_autocast_trains_close_to_fp32(trained, tmp_path):
    common = [*SEQ2SEQ, "trainer.max_steps=4", "model.dropout=0.0", "trainer.val_check_interval=4"]
    path = trained / "train.jsonl"
    for name, precision in (("fp32", "32-true"), ("bf16", "bf16-mixed")):
        args = pairs_cmd(path, tmp_path / name, *common, f"trainer.precision={precision}")
        assert_ok(run_forked(*args, cwd=tmp_path))
    fp32, bf16 = losses(tmp_path / "fp32"), losses(tmp_path / "bf16")
    assert fp32.keys() == bf16.keys() == set(range(4))
    assert fp32 != bf16  # bf16 really ran: other roundings
    assert all(bf16[s] == pytest.approx(fp32[s], rel=0.02) for s in fp32)


@pytest.mark.slow
def test_compile_trains_and_its_checkpoint_generates_without_it(trained, tmp_path):
    """torch.compile (inductor) of the whole encoder-decoder: its first loss, before any update, is
    the eager one; the checkpoint holds plain parameter names and generates eagerly."""
    common = [*SEQ2SEQ, "trainer.max_steps=3", "trainer.val_check_interval=3", "model.dropout=0.0"]
    for name, extra in (("compiled", ["compile=true"]), ("eager", [])):
        args = pairs_cmd(trained / "train.jsonl", tmp_path / name, *common, *extra)
        assert_ok(run_forked(*args, cwd=tmp_path, timeout=900))
    assert losses(tmp_path / "compiled")[0] == pytest.approx(losses(tmp_path / "eager")[0], rel=1e-5)
    assert not any("_orig_mod" in k for k in final_state(tmp_path / "compiled"))
    proc = run_forked(
        "generate.py", f"ckpt={tmp_path / 'compiled'}", "prompt=1", "max_new_tokens=4", cwd=tmp_path
    )
    assert_ok(proc)
    assert proc.stdout.startswith("Q: 1\nA: ")


@pytest.mark.slow
def test_init_from_an_encoder_decoder_run(trained, tmp_path):
    """A new run from the trained one's weights; lr 1e-30 leaves them as loaded."""
    init = [
        "init_from=" + str(trained / "run"),
        "trainer.max_steps=2",
        "optim.lr=1e-30",
        "optim.warmup_steps=0",
    ]
    args = pairs_cmd(trained / "train.jsonl", tmp_path / "next", *init)
    proc = run_forked(*args, cwd=tmp_path)
    assert_ok(proc)
    assert "initialized from" in proc.stdout + proc.stderr
    before, after = final_state(trained / "run"), final_state(tmp_path / "next")
    assert_same_weights(before, after, atol=1e-6)
    assert (
        torch.load(tmp_path / "next/checkpoints/last.ckpt", weights_only=True)["hyper_parameters"]["model"][
            "arch"
        ]
        == "encoder_decoder"
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["export.py", "ckpt=run", "out=exported"],
            "error: arch=encoder_decoder has no Hugging Face equivalent",
        ),
        (
            ["serve.py", "ckpt=run", "port={port}"],
            "is an encoder_decoder model, which serve.py does not serve",
        ),
        (
            ["evaluate.py", "ckpt=run", "task=bpb", "data=shakespeare"],
            "task=bpb scores text with a decoder-only",
        ),
    ],
    ids=["export", "serve", "evaluate-bpb"],
)
def test_commands_for_decoder_only_models_refuse_it_in_one_line(trained, args, message):
    proc = run_forked(*(a.format(port=free_port()) for a in args), cwd=trained)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], proc.stderr[-2000:]
    assert not (trained / "exported").exists()
