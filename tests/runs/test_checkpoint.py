"""Loading checkpoints for inference, and checking one before a run resumes from it: files that are
not checkpoints, or not of this model and vocabulary, are one-line user errors."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from gpt.config import DataConfig
from gpt.data.pairs import data_format
from gpt.errors import UserError
from gpt.interop.export import export
from gpt.interop.hf import TOKENIZER_FILE
from gpt.runs.checkpoint import (
    check_resumable,
    checkpoint_data_config,
    describe_checkpoint,
    load_model,
    load_run,
    save_weights_checkpoint,
)
from gpt.tokenizer import CharTokenizer, TiktokenTokenizer
from tests.helpers import CHARS, assert_same_weights, tiny_model


@pytest.fixture
def ckpt(tmp_path) -> Path:
    tok = CharTokenizer(CHARS)
    return save_weights_checkpoint(tiny_model(vocab_size=tok.vocab_size), tok, tmp_path / "last.ckpt")


def edited(ckpt: Path, edit) -> Path:
    data = torch.load(ckpt, weights_only=True)
    edit(data)
    path = ckpt.with_name("edited.ckpt")
    torch.save(data, path)
    return path


def test_describe_names_the_file_and_its_training_step(ckpt):
    assert describe_checkpoint(ckpt) == f"{ckpt} (weights only, no training step)"
    trained = edited(ckpt, lambda data: data.update(global_step=300))
    assert describe_checkpoint(trained) == f"{trained} (step 300)"


def test_files_that_are_not_checkpoints(ckpt, tmp_path):
    (tmp_path / "truncated.ckpt").write_bytes(ckpt.read_bytes()[:5000])
    (tmp_path / "text.ckpt").write_text("hello")
    for name in ("truncated.ckpt", "text.ckpt"):
        with pytest.raises(UserError, match="is not a checkpoint \\(not the zip archive torch.save writes"):
            load_model(tmp_path / name)
    torch.save({"payload": Path("x")}, tmp_path / "pickled.ckpt")
    with pytest.raises(UserError, match="holds Python objects besides tensors and plain data"):
        load_model(tmp_path / "pickled.ckpt")
    torch.save([1, 2], tmp_path / "list.ckpt")
    with pytest.raises(UserError, match="is not a checkpoint \\(it holds a list, not the dict"):
        load_model(tmp_path / "list.ckpt")


def test_checkpoint_whose_parts_disagree(ckpt):
    def more_characters(data):
        data["hyper_parameters"]["tokenizer"]["chars"] += "éèê"

    with pytest.raises(UserError, match=f"its tokenizer has {len(CHARS) + 3} tokens but its model only"):
        load_model(edited(ckpt, more_characters))

    def one_layer(data):
        data["hyper_parameters"]["model"]["n_layer"] = 1

    with pytest.raises(UserError, match="its weights do not match its model config \\(Error\\(s\\)"):
        load_model(edited(ckpt, one_layer))


def test_resume_needs_the_same_model_shape_and_tokenizer(ckpt):
    model, tok = load_model(ckpt)
    config = model.config
    check_resumable(ckpt, config, tok)
    check_resumable(ckpt, replace(config, dropout=0.1), tok)  # same weights, other training
    with pytest.raises(UserError, match="holds a model of another shape \\(model.n_layer=2 in it, 3 now\\)"):
        check_resumable(ckpt, replace(config, n_layer=3), tok)
    with pytest.raises(UserError, match="model.vocab_size=61 in it, 64 now"):
        check_resumable(ckpt, replace(config, vocab_size=64), tok)
    other = CharTokenizer(CHARS.replace("z", "0"))  # as many characters, not the same ones
    with pytest.raises(UserError, match="trained with a 61-character vocabulary but this run"):
        check_resumable(ckpt, config, other)
    with pytest.raises(UserError, match="data.tokenizer gives tokenizer 'r50k_base'"):
        check_resumable(ckpt, config, TiktokenTokenizer("r50k_base"))


def test_hugging_face_dir_whose_tokenizer_is_not_the_models(tmp_path):
    tok = CharTokenizer(CHARS)
    export(tiny_model(pos_emb="rope", vocab_size=tok.vocab_size), tok, tmp_path / "hf")
    load_model(tmp_path / "hf")
    (tmp_path / "hf" / TOKENIZER_FILE).write_text(json.dumps(CharTokenizer(CHARS + "éèê").to_dict()))
    with pytest.raises(UserError, match=f"its tokenizer has {len(CHARS) + 3} tokens but its model only"):
        load_model(tmp_path / "hf")


def test_load_run_gives_the_data_format_a_checkpoint_was_trained_with(ckpt, tmp_path):
    run = load_run(ckpt)
    assert run.data_format is None and run.path == ckpt  # trained on text
    fmt = data_format(DataConfig(source="pairs", path="pairs.jsonl"))  # the plain template
    model, tok = load_model(ckpt)
    paired = save_weights_checkpoint(model, tok, tmp_path / "pairs.ckpt", data_format=fmt)
    run = load_run(paired)
    assert run.data_format == fmt and run.tokenizer.to_dict() == tok.to_dict()
    assert_same_weights(run.model.state_dict(), model.state_dict())
    older = edited(ckpt, lambda data: data["hyper_parameters"].pop("data_format"))  # saved before it existed
    assert load_run(older).data_format is None
    broken = edited(ckpt, lambda data: data["hyper_parameters"].update(data_format={"template": "plain"}))
    with pytest.raises(UserError, match="its data_format is not a prompt template's"):
        load_run(broken)
    export(tiny_model(pos_emb="rope", vocab_size=tok.vocab_size), tok, tmp_path / "hf")
    assert load_run(tmp_path / "hf").data_format is None


def test_a_checkpoint_gives_back_the_data_config_it_was_saved_with(ckpt, tmp_path):
    data = DataConfig(source="text", path=str(tmp_path / "corpus.txt"), val_windows=24, exclude=["a/*"])
    model, tok = load_model(ckpt)
    saved = save_weights_checkpoint(model, tok, tmp_path / "data.ckpt", data=data)
    plain = torch.load(saved, weights_only=True)  # plain data: no DataConfig pickled
    assert checkpoint_data_config(plain) == data
    assert checkpoint_data_config(torch.load(ckpt, weights_only=True)) is None  # saved without one
    older = edited(ckpt, lambda d: d["hyper_parameters"].pop("data"))  # saved before checkpoints kept it
    assert checkpoint_data_config(torch.load(older, weights_only=True)) is None
    check_resumable(older, model.config, tok)
