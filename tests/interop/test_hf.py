"""Hugging Face interop, checked against transformers itself on small random-weight models:
GPT-2 import, GPT-2 and Llama export, greedy generation, tokenizer files, init_from, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gpt.bpe import bpe_merge_of, train_bpe
from gpt.config import ExportConfig
from gpt.errors import UserError
from gpt.generate.command import sample
from gpt.generate.tokens import generate
from gpt.interop.export import export, write_gpt2_tokenizer
from gpt.interop.hf import hf_format, model_config_from_hf
from gpt.interop.load import load_hf_model
from gpt.runs.checkpoint import load_model
from gpt.runs.export import export_checkpoint
from gpt.tokenizer import ENDOFTEXT, CharTokenizer, TiktokenTokenizer
from gpt.train.init_from import resolve_init
from tests.helpers import (
    assert_one_line_exit,
    command,
    generate_config,
    run_forked,
    tiny_config,
    tiny_model,
)

transformers = pytest.importorskip("transformers")

ATOL = 1e-4
GPT2_SHAPE = dict(pos_emb="learned", norm="layernorm", ffn="gelu", bias=True)
LLAMA_SHAPE = dict(pos_emb="rope", norm="rmsnorm", ffn="swiglu", bias=False, rope_base=500.0)
QWEN3_SHAPE = LLAMA_SHAPE | dict(qk_norm=True)
HF_CLASSES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}
export_main = command("export", ExportConfig, export_checkpoint)  # export.py, in this process
CHARS = CharTokenizer("".join(chr(c) for c in range(40, 90)))  # 50 characters: tiny_config's vocab


def randomize(model: torch.nn.Module, seed: int = 0, scale: float = 0.3) -> None:
    """Random values in every parameter, biases and norm weights included (their inits are 0 and 1,
    which would hide a bias or a norm weight mapped to the wrong place)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * scale)


def hf_gpt2(
    tmp_path: Path, vocab_size: int = 97, n_positions: int = 64, **kw
) -> tuple[Path, torch.nn.Module]:
    config = transformers.GPT2Config(
        n_layer=2, n_head=4, n_embd=32, n_positions=n_positions, vocab_size=vocab_size, **kw
    )
    model = transformers.GPT2LMHeadModel(config).eval()
    randomize(model)
    model.save_pretrained(tmp_path / "hf")
    return tmp_path / "hf", model


def max_diff(ours: torch.nn.Module, theirs: torch.nn.Module, vocab: int, T: int = 32) -> float:
    idx = torch.randint(0, vocab, (2, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return (ours(idx) - theirs(idx).logits).abs().max().item()


@pytest.mark.parametrize("tie", [True, False])
def test_import_gpt2_matches_transformers(tmp_path, tie):
    path, theirs = hf_gpt2(tmp_path, tie_word_embeddings=tie)
    ours = load_hf_model(path)
    assert ours.config.tie_embeddings is tie and ours.config.block_size == 64
    assert max_diff(ours, theirs, 97, T=64) < ATOL


def test_import_llama_matches_transformers(tmp_path):
    config = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        vocab_size=90,
        rms_norm_eps=1e-5,
        rope_theta=300.0,
        tie_word_embeddings=False,
    )
    theirs = transformers.LlamaForCausalLM(config).eval()
    randomize(theirs)
    theirs.save_pretrained(tmp_path / "hf")
    ours = load_hf_model(tmp_path / "hf")
    assert (ours.config.pos_emb, ours.config.hidden_dim, ours.config.rope_base) == ("rope", 80, 300.0)
    assert max_diff(ours, theirs, 90, T=64) < ATOL
    with pytest.raises(UserError, match="cannot tell which tokenizer"):
        load_model(tmp_path / "hf")  # a Llama from elsewhere: its tokenizer is not one of ours


def test_import_qwen3_matches_transformers(tmp_path):
    config = transformers.Qwen3Config(
        hidden_size=32,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=8,
        max_position_embeddings=64,
        vocab_size=90,
        rms_norm_eps=1e-5,
        rope_theta=300.0,
        tie_word_embeddings=True,
    )
    theirs = transformers.Qwen3ForCausalLM(config).eval()
    randomize(theirs)
    theirs.save_pretrained(tmp_path / "hf")
    ours = load_hf_model(tmp_path / "hf")
    assert ours.config.qk_norm and ours.config.tie_embeddings and ours.config.hidden_dim == 80
    assert max_diff(ours, theirs, 90, T=64) < ATOL


def test_import_reads_pytorch_model_bin(tmp_path):
    config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, n_positions=16, vocab_size=40)
    theirs = transformers.GPT2LMHeadModel(config).eval()
    randomize(theirs)
    (tmp_path / "hf").mkdir()
    config.save_pretrained(tmp_path / "hf")
    # OpenAI's hub checkpoints: saved from GPT2Model, so no "transformer." prefix, plus mask buffers.
    sd = {k.removeprefix("transformer."): v for k, v in theirs.state_dict().items() if k != "lm_head.weight"}
    sd["h.0.attn.bias"] = torch.tril(torch.ones(16, 16))[None, None]
    torch.save(sd, tmp_path / "hf" / "pytorch_model.bin")
    assert max_diff(load_hf_model(tmp_path / "hf"), theirs, 40, T=16) < ATOL


@pytest.mark.parametrize(
    "shape",
    [
        GPT2_SHAPE,
        GPT2_SHAPE | dict(tie_embeddings=False, ffn_hidden=48),
        GPT2_SHAPE | dict(ffn="relu2", tie_embeddings=False, zero_init_proj=True),
        LLAMA_SHAPE,
        LLAMA_SHAPE | dict(bias=True, tie_embeddings=False),
        QWEN3_SHAPE,
        QWEN3_SHAPE | dict(tie_embeddings=False),
    ],
    ids=["gpt2", "gpt2-untied", "gpt2-relu2-untied", "llama", "llama-bias-untied", "qwen3", "qwen3-untied"],
)
def test_export_loads_in_transformers_with_same_logits(tmp_path, shape):
    ours = tiny_model(**shape)
    randomize(ours)
    fmt, notes = export(ours, CHARS, tmp_path / "out")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    want = "gpt2" if shape["pos_emb"] == "learned" else "qwen3" if shape.get("qk_norm") else "llama"
    assert type(theirs).__name__ == HF_CLASSES[fmt] and fmt == want
    assert max_diff(ours, theirs, 50) < ATOL
    # One copy of a tied embedding; the directory loads back into our model unchanged.
    from safetensors.torch import load_file

    names = load_file(tmp_path / "out" / "model.safetensors").keys()
    assert ("lm_head.weight" in names) is not ours.config.tie_embeddings
    back, tok = load_model(tmp_path / "out")
    assert tok.to_dict() == CHARS.to_dict() and notes  # char vocabularies: a note, no HF tokenizer
    assert back.config.hidden_dim == ours.config.hidden_dim and back.config.rope_base == ours.config.rope_base
    for name, tensor in ours.state_dict().items():
        torch.testing.assert_close(back.state_dict()[name], tensor, rtol=0, atol=0)


@pytest.mark.parametrize("shape", [GPT2_SHAPE, LLAMA_SHAPE, QWEN3_SHAPE], ids=["gpt2", "llama", "qwen3"])
def test_greedy_generation_matches_transformers(tmp_path, shape):
    ours = tiny_model(**shape, block_size=64)
    randomize(ours, seed=4, scale=0.6)  # varied greedy continuations (small weights repeat one token)
    export(ours, CHARS, tmp_path / "out")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    theirs.generation_config.eos_token_id = None  # generate all the tokens, as ours does
    prompt = torch.tensor([[5, 17, 33, 2, 41]])
    ids = torch.cat(list(generate(ours, prompt, max_new_tokens=40, temperature=0)))
    with torch.no_grad():
        ref = theirs.generate(prompt, do_sample=False, max_new_tokens=40, pad_token_id=0)
    assert ids.tolist() == ref[0, prompt.size(1) :].tolist()
    assert len(set(ids.tolist())) > 3  # a real sequence, not one token repeated


def test_gpt2_tokenizer_files_tokenize_like_tiktoken(tmp_path, shakespeare_text):
    tok = TiktokenTokenizer("r50k_base")
    write_gpt2_tokenizer(tok, tmp_path, max_length=1024)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    text = shakespeare_text[:20_000] + " naïve café 😀 1234567 'll\t\n\n  end"
    assert theirs.encode(text) == tok.encode(text)
    assert theirs.eos_token_id == tok.eot_token == 50256
    assert len(theirs) == tok.vocab_size


@pytest.mark.parametrize("shape", [GPT2_SHAPE, LLAMA_SHAPE], ids=["gpt2", "llama"])
def test_trained_bpe_export_tokenizes_and_generates_as_ours(tmp_path, shakespeare_text, shape):
    """A model on a BPE trained on the corpus (data.tokenizer=train), exported: AutoTokenizer gives
    our ids, and AutoModelForCausalLM's greedy generation, decoded by it, our text."""
    tok = train_bpe([shakespeare_text[:300_000]], 600, "gpt4", [ENDOFTEXT, "<|user|>"])
    ours = tiny_model(**shape, vocab_size=tok.vocab_size, block_size=64)
    randomize(ours, seed=4, scale=0.6)
    fmt, notes = export(ours, tok, tmp_path / "out")
    assert notes == [] and (tmp_path / "out" / "tokenizer.json").is_file()
    theirs_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    text = shakespeare_text[-30_000:] + "\r\n  naïve café 😀 x=1234567\u00a0\u3000end  "
    assert theirs_tok.encode(text) == tok.encode(text)
    assert theirs_tok.decode(tok.encode(text)) == text
    assert (theirs_tok.eos_token_id, len(theirs_tok)) == (tok.eot_token, tok.vocab_size) == (598, 600)
    assert theirs_tok.convert_tokens_to_ids("<|user|>") == 599

    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    theirs.generation_config.eos_token_id = None  # generate all the tokens, as ours does
    prompt = "ROMEO: Wherefore art thou"
    ids = torch.tensor([tok.encode(prompt)])
    ours_ids = torch.cat(list(generate(ours, ids, max_new_tokens=40, temperature=0))).tolist()
    with torch.no_grad():
        ref = theirs.generate(
            theirs_tok(prompt, return_tensors="pt").input_ids,
            do_sample=False,
            max_new_tokens=40,
            pad_token_id=0,
        )
    assert ref[0, : ids.size(1)].tolist() == ids[0].tolist()
    assert ours_ids == ref[0, ids.size(1) :].tolist() and len(set(ours_ids)) > 3
    assert tok.decode(ours_ids) == theirs_tok.decode(ref[0, ids.size(1) :])


def test_bpe_merge_of_finds_the_merge_that_made_a_token():
    ranks = {b"a": 0, b"b": 1, b"c": 2, b"ab": 3, b"bc": 4, b"abc": 5}
    assert bpe_merge_of(b"abc", ranks) == (b"ab", b"c")  # ab is ranked before bc
    assert bpe_merge_of(b"ab", ranks) == (b"a", b"b")


def test_export_refuses_shapes_hf_cannot_express():
    with pytest.raises(UserError, match="pos_emb=sinusoidal has no Hugging Face equivalent"):
        hf_format(tiny_config(pos_emb="sinusoidal"))
    with pytest.raises(UserError, match="^prefix_lm=true .* has no GPT-2 or Llama equivalent"):
        hf_format(tiny_config(**(LLAMA_SHAPE | dict(prefix_lm=True))))
    with pytest.raises(UserError, match="^norm=rmsnorm cannot be exported in gpt2 format"):
        hf_format(tiny_config(pos_emb="learned", norm="rmsnorm"))
    with pytest.raises(UserError, match="^bias=false cannot be exported in gpt2 format"):
        hf_format(tiny_config(**(GPT2_SHAPE | dict(bias=False))))
    with pytest.raises(UserError, match="^ffn=gelu cannot be exported in llama format"):
        hf_format(tiny_config(**(LLAMA_SHAPE | dict(ffn="gelu"))))
    refused = "^value_embeds=true .* no GPT-2, Llama or Qwen3 equivalent; .*value_embeds=false"
    with pytest.raises(UserError, match=refused):
        hf_format(tiny_config(**(LLAMA_SHAPE | dict(value_embeds=True))))
    with pytest.raises(UserError, match="^logit_softcap=15.0 has no GPT-2, Llama or Qwen3 equivalent"):
        hf_format(tiny_config(**(GPT2_SHAPE | dict(logit_softcap=15.0))))
    with pytest.raises(UserError, match="^ffn=relu2 cannot be exported in llama format"):
        hf_format(tiny_config(**(LLAMA_SHAPE | dict(ffn="relu2"))))
    with pytest.raises(UserError, match="^qk_norm=true cannot be exported in gpt2 format"):
        hf_format(tiny_config(**(GPT2_SHAPE | dict(qk_norm=True))))
    with pytest.raises(UserError, match="^qk_norm=true cannot be exported in llama format"):
        hf_format(tiny_config(**QWEN3_SHAPE), "llama")
    with pytest.raises(UserError, match="^qk_norm=false cannot be exported in qwen3 format"):
        hf_format(tiny_config(**LLAMA_SHAPE), "qwen3")
    with pytest.raises(UserError, match="unknown export format 'onnx'"):
        hf_format(tiny_config(**GPT2_SHAPE), "onnx")


def test_init_from_loads_weights_and_refuses_mismatches(tmp_path):
    path, theirs = hf_gpt2(tmp_path, vocab_size=50257)
    given = {"data.tokenizer"}  # data.tokenizer given on the command line: it must be the checkpoint's

    def init(model: torch.nn.Module, data_tokenizer: str = "r50k_base", source: str = str(path)) -> None:
        # model=NAME on the command line: its config, which must have the checkpoint's shape
        resolved = resolve_init(source, model.config, data_tokenizer, {"model", *given})
        resolved.load_into(model)

    ours = tiny_model(**GPT2_SHAPE, vocab_size=50257, block_size=48)  # a shorter context is allowed
    init(ours)
    assert max_diff(ours, theirs, 50257, T=48) < ATOL
    with pytest.raises(UserError, match="^model.n_layer=3 but init_from=.* has n_layer=2"):
        init(tiny_model(**GPT2_SHAPE, vocab_size=50257, n_layer=3))
    with pytest.raises(UserError, match="^model.norm=rmsnorm but"):
        init(tiny_model(**(GPT2_SHAPE | dict(norm="rmsnorm")), vocab_size=50257))
    with pytest.raises(UserError, match="^model.block_size=128 exceeds"):
        init(tiny_model(**GPT2_SHAPE, vocab_size=50257, block_size=128))
    with pytest.raises(UserError, match="^data.tokenizer=char but .* was trained with r50k_base"):
        init(tiny_model(**GPT2_SHAPE), "char")
    with pytest.raises(UserError, match="^init_from=.*nowhere does not exist; pass a run dir"):
        init(tiny_model(**GPT2_SHAPE), source=str(tmp_path / "nowhere"))
    # Nothing on the command line: the checkpoint's config (its dropout too) and tokenizer.
    resolved = resolve_init(str(path), tiny_config(), "char", set())
    assert resolved.model_config == model_config_from_hf(theirs.config.to_dict())
    assert resolved.tokenizer.to_dict() == {"kind": "tiktoken", "name": "r50k_base"}


def test_init_from_hub_name_offline_is_one_line(tmp_path):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HF_HOME", str(tmp_path / "hf-home"))  # an empty cache: nothing to fall back on
        mp.chdir(tmp_path)  # no folder named gpt2 here
        with pytest.raises(
            UserError, match="^could not download openai-community/gpt2 from the Hugging Face hub"
        ):
            resolve_init("gpt2", tiny_config(**GPT2_SHAPE), "r50k_base", set())


def test_train_init_from_then_generate_and_export(tmp_path, tiny_corpus, capsys):
    """train.py init_from=DIR starts from the checkpoint's weights; generation and export read
    Hugging Face dirs and runs trained from them."""
    path, theirs = hf_gpt2(tmp_path, vocab_size=50257)
    # lr 1e-12: one step leaves the weights where the checkpoint put them (within float rounding).
    proc = run_forked("train.py", *init_from_args(tiny_corpus, path), "hydra.run.dir=run", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"initialized from {path}" in proc.stdout
    trained = torch.load(tmp_path / "run/checkpoints/last.ckpt", weights_only=True)["state_dict"]
    hf_c_attn = theirs.transformer.h[1].attn.c_attn.weight.detach().t()  # Conv1D: (in, out)
    torch.testing.assert_close(trained["model.h.1.attn.c_attn.weight"], hf_c_attn, rtol=0, atol=1e-6)
    hf_wte = theirs.transformer.wte.weight.detach()
    torch.testing.assert_close(trained["model.wte.weight"], hf_wte, rtol=0, atol=1e-6)

    # generate.py's code path, on the Hugging Face dir itself.
    cfg = generate_config(ckpt=str(path), prompt="Hello", max_new_tokens=5, temperature=0)
    capsys.readouterr()
    (text,) = sample(cfg, write=lambda _: None)
    assert capsys.readouterr().err.splitlines() == [f"checkpoint: {path} (Hugging Face)"]
    model, tok = load_model(path)
    ids = torch.cat(list(generate(model, torch.tensor([tok.encode("Hello")]), 5, temperature=0)))
    assert text == tok.decode(ids.tolist())

    export_main([f"ckpt={tmp_path}/run", f"out={tmp_path}/exported"])
    printed = capsys.readouterr()
    assert "wrote gpt2 format" in printed.out
    assert printed.err.splitlines()[0] == f"checkpoint: {tmp_path}/run/checkpoints/last.ckpt (step 1)"
    assert json.loads((tmp_path / "exported/config.json").read_text())["model_type"] == "gpt2"
    assert (tmp_path / "exported/merges.txt").is_file() and (tmp_path / "exported/vocab.json").is_file()
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "exported").eval()
    ours, _ = load_model(tmp_path / "run")
    assert max_diff(ours, reloaded, 50257) < ATOL


def init_from_args(corpus: Path, path: Path, *shape: str) -> list[str]:
    shape = shape or ("model.n_layer=2", "model.n_head=4", "model.n_embd=32", "model.block_size=32")
    return [
        "data=text",
        f"data.path={corpus}",
        "data.tokenizer=r50k_base",
        "data.val_windows=4",
        "model=gpt2",
        *shape,
        f"init_from={path}",
        "trainer.max_steps=1",
        "optim.lr=1e-12",
        "optim.warmup_steps=0",
        "callbacks.samples.every_n_steps=0",
    ]


@pytest.mark.slow
def test_cli_refuses_mismatched_init_from_and_generates_from_hf_dir(tmp_path, tiny_corpus):
    path, _ = hf_gpt2(tmp_path, vocab_size=50257)
    refused = run_forked("train.py", *init_from_args(tiny_corpus, path, "model.n_layer=12"), cwd=tmp_path)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert refused.stderr.strip().splitlines()[-1] == (
        f"error: model.n_layer=12 but init_from={path} has n_layer=2; "
        "leave out model= to use the checkpoint's config"
    )
    gen = run_forked("generate.py", f"ckpt={path}", "prompt=Hello", "max_new_tokens=5", cwd=tmp_path)
    assert gen.returncode == 0 and gen.stdout.startswith("Hello"), gen.stderr[-2000:]


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["ckpt=a", "out=b", "format=onnx"],
            "unknown export format 'onnx'; use format=auto, gpt2, llama or qwen3",
        ),
        (["ckpt=nope.ckpt", "out=b"], "checkpoint nope.ckpt does not exist"),
        (["ckpt=", "out=b"], "no checkpoint under runs/; train one"),  # empty: the newest run
        (["ckpt=a", "outdir=b"], "Could not override 'outdir': Key 'outdir' not in 'ExportConfig'"),
        (["ckpt=a"], "say where to write the export: python export.py ckpt=RUN_OR_CKPT out=DIR"),
        (["ckpt=a", "out="], "say where to write the export"),
        (["ckpt=a", "out=null"], "say where to write the export"),
        (["ckpt=a", "out=b", "dtype=float64"], "dtype=float64 is not one of float32, bfloat16, float16"),
    ],
)
def test_export_cli_errors_are_one_line(tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    assert_one_line_exit(export_main, args, message, capsys)
    assert not (tmp_path / "b").exists()
