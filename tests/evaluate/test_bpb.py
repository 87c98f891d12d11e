"""Bits per byte without Lightning (gpt/evaluate/bpb.py): the same number as the run's own validation,
every val token once in mode "all", and the corpus chosen (given, or the checkpoint's) or refused."""

from __future__ import annotations

import math
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gpt.config import DataConfig, OptimConfig
from gpt.data.datamodule import GPTDataModule
from gpt.data.prepare import prepare
from gpt.data.windows import FULL_VAL_WINDOWS
from gpt.errors import UserError
from gpt.evaluate.bpb import all_spans, bpb_data, bpb_metrics, bpb_windows, score_bpb
from gpt.runs.checkpoint import load_model, read_checkpoint
from gpt.runs.metrics import read_metrics
from gpt.tokenizer import CharTokenizer
from gpt.train.lit_module import GPTLitModule
from tests.helpers import fit, split_tokens, text_cfg, tiny_config, tiny_model, write_corpus, write_documents

BLOCK = 32


@pytest.fixture(scope="module")
def corpus_cfg(tmp_path_factory) -> DataConfig:
    """40,000 characters of Shakespeare with a few 2-, 3- and 4-byte characters, so that bytes are
    not tokens; 8 validation windows of 4 a batch."""
    tmp = tmp_path_factory.mktemp("bpb")
    path = write_corpus(tmp / "corpus.txt")
    text = path.read_text(encoding="utf-8").replace("the", "thé").replace("and", "and€").replace("?", "?😀")
    path.write_text(text, encoding="utf-8")
    return text_cfg(path, tmp, val_windows=8, batch_size=4)


@pytest.fixture(scope="module")
def module(corpus_cfg) -> GPTLitModule:
    """A random tiny model with a padded vocabulary (padding ids weigh 0 bytes) and the corpus's
    own character tokenizer, in eval mode."""
    tok = prepare(corpus_cfg, verbose=False).tokenizer()
    torch.manual_seed(0)
    config = tiny_config(vocab_size=tok.vocab_size + 3, block_size=BLOCK)
    return GPTLitModule.from_configs(config, OptimConfig(), tok).eval()


def lightning_validation(module: GPTLitModule, cfg: DataConfig) -> dict[str, float]:
    """val/loss, val/ppl and val/bpb as training logs them: the data module's val loader through
    validation_step and on_validation_epoch_end."""
    datamodule = GPTDataModule(cfg, block_size=BLOCK, prepared=prepare(cfg, verbose=False))
    datamodule.setup("validate")
    logged = {}
    module.log_dict = lambda values, **kwargs: logged.update({k: float(v) for k, v in values.items()})
    with torch.no_grad():
        for i, batch in enumerate(datamodule.val_dataloader()):
            module.validation_step(batch, i)
        module.on_validation_epoch_end()
    return logged


def test_val_windows_give_the_validation_metrics_of_training(module, corpus_cfg):
    logged = lightning_validation(module, corpus_cfg)
    windows = bpb_windows(corpus_cfg, module.tokenizer, BLOCK, "val")
    sums = score_bpb(module.model, module.tokenizer, windows, batch_size=3)  # not the loader's 4
    assert sums["windows"] == 8 and sums["tokens"] == 8 * BLOCK
    assert sums["bytes"] > sums["tokens"]  # the multi-byte characters are counted as bytes
    metrics = bpb_metrics(sums)
    assert metrics["bpb"] == pytest.approx(logged["val/bpb"], rel=1e-6)
    assert metrics["loss"] == pytest.approx(logged["val/loss"], rel=1e-6)
    assert metrics["ppl"] == pytest.approx(logged["val/ppl"], rel=1e-6)


def test_doc_mask_windows_give_the_validation_metrics_of_training(tmp_path):
    """data.doc_mask: bpb scores the validation windows with the documents masked as validation
    masks them, which is not what the same windows score unmasked."""
    cfg = text_cfg(
        write_documents(tmp_path / "docs"), tmp_path, tokenizer="r50k_base", doc_mask=True, val_windows=6
    )
    tok = prepare(cfg, verbose=False).tokenizer()
    torch.manual_seed(0)
    module = GPTLitModule.from_configs(
        tiny_config(vocab_size=tok.vocab_size, block_size=BLOCK), OptimConfig(), tok
    ).eval()
    logged = lightning_validation(module, cfg)
    windows = bpb_windows(cfg, tok, BLOCK, "val")
    assert len(windows[0]) == 4  # x, y, positions, segments
    metrics = bpb_metrics(score_bpb(module.model, tok, windows, batch_size=4))
    assert metrics["bpb"] == pytest.approx(logged["val/bpb"], rel=1e-6)
    assert metrics["loss"] == pytest.approx(logged["val/loss"], rel=1e-6)
    unmasked = bpb_metrics(
        score_bpb(module.model, tok, bpb_windows(replace(cfg, doc_mask=False), tok, BLOCK, "val"), 4)
    )
    assert unmasked["loss"] != pytest.approx(metrics["loss"], rel=1e-6)


def test_the_sums_are_over_the_targets_and_bpb_over_the_text_ones():
    tok = CharTokenizer("aé€😀", eot=True)  # 1, 2, 3 and 4 bytes; end-of-text (4) none
    model = tiny_model(vocab_size=6, block_size=8)  # one padding id
    x, y = torch.tensor([0, 0, 4, 1]), torch.tensor([1, 4, 3, 3])
    windows = [(x, y), (y[:2], x[:2])]  # of unequal lengths
    sums = score_bpb(model, tok, windows, batch_size=2)
    with torch.no_grad():
        per_target = [F.cross_entropy(model(a[None])[0], b, reduction="none") for a, b in windows]
    assert sums["nats"] == pytest.approx(float(sum(n.sum() for n in per_target)), rel=1e-6)
    text_nats = sum(n[b != tok.eot_token].sum() for n, (_, b) in zip(per_target, windows, strict=True))
    assert sums["text_nats"] == pytest.approx(float(text_nats), rel=1e-6) and text_nats < sums["nats"]
    assert {k: sums[k] for k in ("tokens", "bytes", "windows")} == {
        "tokens": 6,
        "bytes": 2 + 0 + 4 + 4 + 1 + 1,
        "windows": 2,
    }


def test_end_of_text_counts_neither_nats_nor_bytes_as_in_validation():
    """Zero logits put ln 8 nats on every target: bpb is the 3 text targets' 3 x 3 bits over their
    1 + 2 + 4 bytes, and the loss ln 8 over all 4; validation gives the same numbers."""
    tok = CharTokenizer("aé€😀", eot=True)  # end-of-text is id 4; 5-7 pad the vocabulary
    module = GPTLitModule.from_configs(tiny_config(vocab_size=8, block_size=8), OptimConfig(), tok).eval()
    torch.nn.init.zeros_(module.model.lm_head.weight)
    x, y = torch.tensor([0, 1, 3, 4]), torch.tensor([1, 3, 4, 0])  # é 😀 end-of-text a
    sums = score_bpb(module.model, tok, [(x, y)], batch_size=1)
    assert sums == pytest.approx(
        {"nats": 4 * math.log(8), "tokens": 4, "text_nats": 3 * math.log(8), "bytes": 7, "windows": 1},
        rel=1e-6,
    )
    metrics = bpb_metrics(sums)
    assert metrics["bpb"] == pytest.approx(9 / 7, rel=1e-6)
    assert metrics["loss"] == pytest.approx(math.log(8), rel=1e-6)
    logged = {}
    module.log_dict = lambda values, **kwargs: logged.update({k: float(v) for k, v in values.items()})
    with torch.no_grad():
        module.validation_step((x[None], y[None]), 0)
        module.on_validation_epoch_end()
    assert logged == pytest.approx({"val/bpb": 9 / 7, "val/loss": math.log(8), "val/ppl": 8.0}, rel=1e-6)


def test_bpb_metrics_formulas():
    sums = {"nats": 6.0, "tokens": 4.0, "text_nats": 5.0, "bytes": 3.0, "windows": 1.0}
    assert bpb_metrics(sums) == {"bpb": 5 / (math.log(2) * 3), "loss": 1.5, "ppl": math.exp(1.5)}


def test_all_spans_make_every_token_after_the_first_a_target_once():
    assert all_spans(10, 4) == [(0, 5), (4, 9), (8, 10)]  # targets 1-4, 5-8, 9
    assert all_spans(9, 4) == [(0, 5), (4, 9)]  # no empty last window
    assert all_spans(2, 4) == [(0, 2)]


def test_all_windows_score_every_val_token_once_whatever_the_batch_size(module, corpus_cfg):
    tok = module.tokenizer
    val = split_tokens(prepare(corpus_cfg, verbose=False), "val")
    windows = bpb_windows(corpus_cfg, tok, BLOCK, "all")
    assert windows.n_tokens == len(val) and (len(val) - 1) % BLOCK  # so the last window is shorter
    targets = np.concatenate([y.numpy() for _, y in windows])
    assert targets.tolist() == val[1:].tolist()
    assert all(torch.equal(x[1:], y[:-1]) for x, y in windows)
    sums = score_bpb(module.model, tok, windows, batch_size=4)
    assert sums["tokens"] == len(val) - 1 and sums["windows"] == len(windows)
    n_bytes = len(tok.decode_bytes(val.tolist())) - len(tok.decode_bytes(val[:1].tolist()))
    assert sums["bytes"] == n_bytes
    for batch_size in (1, 7, 1000):
        other = score_bpb(module.model, tok, windows, batch_size=batch_size)
        assert {k: other[k] for k in ("tokens", "bytes", "windows")} == {
            k: sums[k] for k in ("tokens", "bytes", "windows")
        }
        assert other["nats"] == pytest.approx(sums["nats"], rel=1e-6)
    # Shards as DDP ranks take them ([rank::world]) add up to the whole.
    shards = [score_bpb(module.model, tok, windows[r::3], batch_size=4) for r in range(3)]
    for key in ("tokens", "bytes", "windows"):
        assert sum(s[key] for s in shards) == sums[key]
    assert sum(s["nats"] for s in shards) == pytest.approx(sums["nats"], rel=1e-6)


def test_limit_takes_the_first_windows(module, corpus_cfg):
    tok = module.tokenizer
    for mode in ("val", "all"):
        whole = bpb_windows(corpus_cfg, tok, BLOCK, mode)
        first = bpb_windows(corpus_cfg, tok, BLOCK, mode, limit=3)
        assert len(first) == 3 and first.spans == whole.spans[:3]
        assert score_bpb(module.model, tok, first, 4) == score_bpb(module.model, tok, whole[:3], 4)
    assert len(bpb_windows(corpus_cfg, tok, BLOCK, "val", limit=100)) == 8  # no more than there are


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def test_the_corpus_given_or_the_checkpoints(tmp_path):
    path = Path("runs/x/checkpoints/last.ckpt")
    given = DataConfig(source="text", path="a.txt")
    assert bpb_data(given, None, path).val_windows == FULL_VAL_WINDOWS  # null: the full validation set
    assert bpb_data(DataConfig(val_windows=7), None, path) == DataConfig(val_windows=7)
    recorded = DataConfig(source="text", path="b.txt", val_windows=16)
    ckpt = {"hyper_parameters": {"model": {}, "data": asdict(recorded)}}
    assert bpb_data(None, ckpt, path) == recorded
    assert bpb_data(given, ckpt, path).path == given.path  # a corpus given wins over the record

    for ckpt in ({"hyper_parameters": {"model": {}}}, {"hyper_parameters": {"data": None}}, None):
        with pytest.raises(UserError) as error:
            bpb_data(None, ckpt, path)
        assert one_line(error).startswith(f"{path} does not record its training data (a Hugging Face dir,")
        assert "pass the corpus: data=shakespeare, data=text data.path=FILE" in one_line(error)

    pairs = {"hyper_parameters": {"data": asdict(DataConfig(source="pairs", path="p.jsonl"))}}
    with pytest.raises(UserError) as error:
        bpb_data(None, pairs, path)
    assert "task=bpb scores a text corpus" in one_line(error)
    assert "trained on prompt -> completion pairs" in one_line(error) and "task=generate" in one_line(error)


def test_a_finished_run_scores_its_own_last_val_bpb(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.txt")
    run = tmp_path / "run"
    fit(corpus, run, "trainer.max_steps=3", "data.val_windows=null")  # validates at its last step
    path = run / "checkpoints" / "last.ckpt"
    data = bpb_data(None, read_checkpoint(path, mmap=True), path)
    assert data.val_windows == FULL_VAL_WINDOWS  # resolved before the checkpoint recorded it
    assert data.path == str(corpus) and data.source == "text"
    model, tok = load_model(path)
    sums = score_bpb(model, tok, bpb_windows(data, tok, model.config.block_size, "val"), batch_size=64)
    (last,) = [row for row in read_metrics(run) if "val/bpb" in row]  # one validation: the last weights
    assert bpb_metrics(sums)["bpb"] == pytest.approx(last["val/bpb"], rel=1e-6)
    assert bpb_metrics(sums)["loss"] == pytest.approx(last["val/loss"], rel=1e-6)
