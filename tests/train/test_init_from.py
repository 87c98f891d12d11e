"""init_from=: a new run starts from a run dir's or .ckpt's weights, with its model config (fields
the command line sets on top) and its tokenizer (a character model's vocabulary tokenizes the new
corpus), at step 0 with a fresh optimizer; an end-of-text token grows a character model by one row."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from gpt.config import ModelConfig
from gpt.errors import UserError
from gpt.model.transformer import GPT
from gpt.runs.checkpoint import clean_state_dict, save_weights_checkpoint
from gpt.tokenizer import CharTokenizer, TiktokenTokenizer
from gpt.train.init_from import overridden_keys, resolve_init
from tests.helpers import (
    CHARS,
    assert_same_weights,
    build_in_process,
    fit,
    tiny_config,
    tiny_model,
    write_corpus,
)

# The pretrained run's shape: not the composed config's (experiment=tiny: 2 layers, 128 wide), so
# that a run given no model= shows it took the checkpoint's.
SHAPE = ("model.n_layer=1", "model.n_embd=48")


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """A run dir: 2 steps of a 1-layer character model on 40,000 characters of Shakespeare."""
    root = tmp_path_factory.mktemp("pretrained")
    corpus = write_corpus(root / "corpus.txt")
    fit(corpus, root / "run", *SHAPE, "trainer.max_steps=2")
    return root / "run"


@pytest.fixture
def lower_corpus(pretrained: Path, tmp_path: Path) -> Path:
    """Other text, with fewer characters than the pretraining corpus: a vocabulary built from it
    would give every character another id."""
    path = tmp_path / "lower.txt"
    path.write_text((pretrained.parent / "corpus.txt").read_text(encoding="utf-8").lower(), encoding="utf-8")
    return path


def saved(run: Path) -> dict:
    return torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)


def test_a_new_run_starts_at_step_0_from_the_checkpoint(pretrained, lower_corpus, tmp_path):
    ckpt = saved(pretrained)
    trainer, module, datamodule = build_in_process(
        lower_corpus, tmp_path / "ft", f"init_from={pretrained}", "trainer.max_steps=1"
    )
    # no model= given: the checkpoint's config (model.dropout=0.1 of BASE is the checkpoint's too)
    assert module.model.config == ModelConfig(**ckpt["hyper_parameters"]["model"])
    assert module.model.config.n_embd == 48 and module.model.config.n_layer == 1
    assert_same_weights(module.model.state_dict(), clean_state_dict(ckpt["state_dict"]))
    # the corpus is tokenized with the checkpoint's character vocabulary, not its own
    chars = ckpt["hyper_parameters"]["tokenizer"]
    assert module.tokenizer.to_dict() == datamodule.prepared.meta["tokenizer"] == chars
    assert set(lower_corpus.read_text()) < set(chars["chars"])

    trainer.fit(module, datamodule=datamodule)
    after = torch.load(tmp_path / "ft" / "checkpoints" / "last.ckpt", weights_only=True)
    assert after["global_step"] == 1  # started at step 0: one step to max_steps=1
    adam = after["optimizer_states"][0]["state"]
    assert {float(s["step"]) for s in adam.values()} == {1.0}  # a fresh optimizer


def test_command_line_fields_apply_on_top_of_the_checkpoint(pretrained, lower_corpus, tmp_path):
    ckpt = saved(pretrained)
    _, module, _ = build_in_process(
        lower_corpus, tmp_path / "ft", f"init_from={pretrained}", "model.dropout=0.0", "model.block_size=16"
    )
    want = ModelConfig(**ckpt["hyper_parameters"]["model"] | {"dropout": 0.0, "block_size": 16})
    assert module.model.config == want
    weights = clean_state_dict(ckpt["state_dict"])
    weights["wpe.weight"] = weights["wpe.weight"][:16]  # a shorter context keeps the first positions
    assert_same_weights(module.model.state_dict(), weights)


def test_a_model_preset_or_field_must_fit_the_checkpoint(pretrained):
    composed = tiny_config(n_embd=128)  # experiment=tiny's, which model=nano would give
    with pytest.raises(UserError, match="^model.n_layer=2 but init_from=.* has n_layer=1; leave out model="):
        resolve_init(str(pretrained), composed, "char", {"model"})
    with pytest.raises(UserError, match="^model.n_embd=128 but .* has n_embd=48; leave out model.n_embd to"):
        resolve_init(str(pretrained), composed, "char", {"model.n_embd"})
    with pytest.raises(UserError, match="^model.block_size=64 exceeds init_from=.*'s 32 learned positions"):
        resolve_init(str(pretrained), tiny_config(block_size=64), "char", {"model.block_size"})


def test_a_longer_context_is_allowed_where_positions_are_computed(tmp_path):
    """Rotary positions have no weights: a model pretrained on 32 tokens fine-tunes on 64."""
    config = ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=32, vocab_size=3, pos_emb="rope")
    path = save_weights_checkpoint(GPT(config), CharTokenizer("ab", eot=True), tmp_path / "rope.ckpt")
    longer = resolve_init(str(path), replace(config, block_size=64), "char", {"model.block_size"})
    assert longer.model_config.block_size == 64
    model = GPT(longer.model_config)
    longer.load_into(model)
    assert torch.equal(model.wte.weight, torch.load(path)["state_dict"]["model.wte.weight"])
    learned = replace(config, pos_emb="learned")
    path = save_weights_checkpoint(GPT(learned), CharTokenizer("ab", eot=True), tmp_path / "learned.ckpt")
    with pytest.raises(UserError, match="exceeds init_from=.*'s 32 learned positions"):
        resolve_init(str(path), replace(learned, block_size=64), "char", {"model.block_size"})


def test_a_ckpt_file_and_a_run_dir(pretrained, tmp_path):
    last = pretrained / "checkpoints" / "last.ckpt"
    by_file = resolve_init(str(last), tiny_config(), "char", set())
    by_dir = resolve_init(str(pretrained), tiny_config(), "char", set())
    assert by_file.path == by_dir.path == last
    model = GPT(by_file.model_config)
    by_file.load_into(model)
    assert_same_weights(model.state_dict(), clean_state_dict(saved(pretrained)["state_dict"]))
    assert by_file.notes() == [f"initialized from {last} (step 2)"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="^no last.ckpt .* in .*empty; pass a .ckpt file, a run dir"):
        resolve_init(str(tmp_path / "empty"), tiny_config(), "char", set())
    (tmp_path / "other.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="other.ckpt is not a checkpoint .*; pass another init_from=PATH$"):
        resolve_init(str(tmp_path / "other.ckpt"), tiny_config(), "char", set())


def test_the_tokenizer_is_the_checkpoints(pretrained, tmp_path):
    bpe = save_weights_checkpoint(
        tiny_model(vocab_size=50257), TiktokenTokenizer("r50k_base"), tmp_path / "b.ckpt"
    )
    given = {"data.tokenizer"}
    with pytest.raises(UserError) as e:
        resolve_init(str(bpe), tiny_config(), "cl100k_base", given)
    assert str(e.value) == (
        f"data.tokenizer=cl100k_base but init_from={bpe} was trained with r50k_base; "
        "set data.tokenizer=r50k_base"
    )
    assert resolve_init(str(bpe), tiny_config(), "gpt2", given).tokenizer.name == "r50k_base"  # an alias
    # data.tokenizer not on the command line (a data preset's): the checkpoint's
    assert resolve_init(str(bpe), tiny_config(), "char", set()).tokenizer.name == "r50k_base"
    with pytest.raises(
        UserError, match="^data.tokenizer=r50k_base but .* was trained with char; set data.tok"
    ):
        resolve_init(str(pretrained), tiny_config(), "r50k_base", given)


@pytest.mark.parametrize(
    "options", [{"tie_embeddings": True}, {"tie_embeddings": False}, {"value_embeds": True}], ids=str
)
def test_an_end_of_text_token_adds_one_row_the_mean_of_the_others(tmp_path, options):
    n = len(CHARS)
    old = tiny_model(vocab_size=n, **options)
    grown = ("wte.weight", "lm_head.weight", *(("wve.weight",) if options.get("value_embeds") else ()))
    path = save_weights_checkpoint(old, CharTokenizer(CHARS), tmp_path / "c.ckpt")
    init = resolve_init(str(path), tiny_config(), "char", set(), need_eot=True)
    assert init.model_config == replace(old.config, vocab_size=n + 1)
    assert init.tokenizer.to_dict() == {"kind": "char", "chars": CHARS, "eot": True}
    assert init.tokenizer.eot_token == n
    model = GPT(init.model_config)
    init.load_into(model)
    for name in grown:  # the embeddings (value embeddings too) and the head
        was, now = old.state_dict()[name], model.state_dict()[name]
        assert torch.equal(now[:n], was)  # the old rows, bit-identical
        assert torch.equal(now[n], was.mean(0))
    others = {k: v for k, v in model.state_dict().items() if k not in grown}
    assert_same_weights(others, {k: old.state_dict()[k] for k in others})
    assert init.notes()[1] == (
        f"added an end-of-text token: vocab_size {n} -> {n + 1}, its embedding row the mean of the others"
    )


def test_an_end_of_text_token_in_a_padded_vocabulary_needs_no_row(tmp_path):
    n = len(CHARS)
    old = tiny_model(vocab_size=n + 3)
    path = save_weights_checkpoint(old, CharTokenizer(CHARS), tmp_path / "c.ckpt")
    init = resolve_init(str(path), tiny_config(), "char", set(), need_eot=True)
    assert init.model_config.vocab_size == n + 3 and init.tokenizer.eot_token == n
    model = GPT(init.model_config)
    init.load_into(model)
    assert_same_weights(model.state_dict(), old.state_dict())
    assert len(init.notes()) == 1


def test_a_resumed_run_continues_from_its_own_checkpoint(pretrained, lower_corpus, tmp_path):
    """Its weights, model config and tokenizer: the checkpoint it started from may be gone."""
    source = tmp_path / "source"
    shutil.copytree(pretrained, source)
    run = tmp_path / "ft"
    fit(lower_corpus, run, f"init_from={source}", "model.block_size=16", "trainer.max_steps=1")
    shutil.rmtree(source)
    last = run / "checkpoints" / "last.ckpt"
    # With the source gone, loading its weights would fail: the resumed run only reads its own.
    _, module, _ = build_in_process(
        lower_corpus, run, f"init_from={source}", "model.block_size=16", ckpt_path=str(last)
    )
    assert module.model.config == ModelConfig(**saved(run)["hyper_parameters"]["model"])
    assert module.model.config.n_embd == 48 and module.model.config.block_size == 16


def test_overridden_keys():
    keys = overridden_keys(["model=small", "model.dropout=0.1", "+model.x=1", "~data.tokenizer", "seed=1"])
    assert keys == {"model", "model.dropout", "model.x", "data.tokenizer", "seed"}
