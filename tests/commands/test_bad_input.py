"""The bad-input catalogue (issue 8): every user-facing command answers bad input with exit code 2
and one line on stderr that says what was wrong and what to do, never a traceback, and changes
nothing already saved.

Each case runs the real command in a process of its own (forked off a warm Python: run_forked)
against one finished tiny run (built once for the module) and compares a snapshot of every file
under the working folder (the run dir, the prepared data cache, an export, the inputs the cases
read) before and after.
"""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from gpt.config import DataConfig
from gpt.data.prepare import prepare
from gpt.errors import EXIT_USER_ERROR
from gpt.interop.export import export
from gpt.runs.checkpoint import save_weights_checkpoint
from gpt.tokenizer import CharTokenizer, TiktokenTokenizer
from tests.helpers import free_port, run_forked, tiny_model, write_corpus

# Its tests share costly module fixtures: one xdist worker runs them all, the fixtures once.
pytestmark = pytest.mark.xdist_group(__name__)


@dataclass(frozen=True)
class Case:
    args: tuple[str, ...]  # the command line; {run}, {cache}, ... are paths of the `work` fixture
    message: str  # what the error line must say (so that the right error fired)
    env: dict[str, str] = field(default_factory=dict)


# The tiny run every train.py case points at: hydra.run.dir is the finished run, so a case that got
# past its error would resume it (and change its files).
TRAIN = (
    "train.py",
    "experiment=tiny",
    "data=text",
    "data.path={corpus}",
    "data.cache_dir={cache}",
    "model.n_embd=32",
    "data.batch_size=4",
    "data.val_windows=8",
    "trainer.max_steps=4",
    "trainer.val_check_interval=4",
    "optim.warmup_steps=1",
    "~callbacks.progress_bar",
    "hydra.run.dir={run}",
)
GENERATE = ("generate.py", "ckpt={run}", "max_new_tokens=5")
# No network: every proxy is a closed port, and the tiktoken cache an empty folder.
OFFLINE = {
    name: "http://127.0.0.1:{closed_port}"
    for name in ("HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy")
} | {"NO_PROXY": "", "no_proxy": "", "TIKTOKEN_CACHE_DIR": "{inputs}/empty-tiktoken-cache"}
NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")


def train(*extra: str, message: str, env: dict[str, str] | None = None) -> Case:
    return Case((*TRAIN, *extra), message, env or {})


def new_run(*extra: str, message: str, env: dict[str, str] | None = None) -> Case:
    """A train.py case in the default run dir, runs/<date>/<time>/ under the working folder: the
    snapshot shows it if the failed start left it (or runs/) behind."""
    return Case((*(a for a in TRAIN if not a.startswith("hydra.run.dir=")), *extra), message, env or {})


def pairs(*extra: str, message: str) -> Case:
    """A train.py case with data=pairs (on {inputs}/pairs.jsonl unless it says otherwise) in the
    default run dir, as new_run: neither the run dir nor the prepared examples may be left behind."""
    text = ("hydra.run.dir=", "data=", "data.path=")
    keep = (a for a in TRAIN if not a.startswith(text))
    return Case((*keep, "data=pairs", "data.path={inputs}/pairs.jsonl", *extra), message)


def generate(*extra: str, message: str) -> Case:
    return Case((*GENERATE, *extra), message)


def command(*args: str, message: str, env: dict[str, str] | None = None) -> Case:
    return Case(args, message, env or {})


RUN = "{run}/checkpoints/last.ckpt"
CASES = {
    # train.py: the config, the data, the checkpoint it would resume, the machine
    "train-unknown-key": train("model.n_layr=2", message="Key 'n_layr' not in 'ModelConfig'"),
    "train-wrong-type": train(
        "model.n_layer=two", message="Value 'two' of type 'str' could not be converted"
    ),
    "train-unknown-optimizer": train("optim=sgd", message="there is no optim=sgd; choose one of adamw, muon"),
    "train-unknown-model-preset": train("model=tiny", message="there is no model=tiny; choose one of gpt2,"),
    "train-unknown-experiment": train(
        "experiment=typo",
        message="there is no experiment=typo; choose one of numbers, numbers_seq2seq, shakespeare_char_cpu,",
    ),
    # Hydra would print its own message over several lines and exit with 1.
    "train-unknown-optimizer-with-hydra-full-error-0": train(
        "optim=sgd", message="there is no optim=sgd;", env={"HYDRA_FULL_ERROR": "0"}
    ),
    "train-unquoted-tilde": train(
        "data.path=~/corpus.txt",
        message="""'data.path=~/corpus.txt'; put the value in quotes inside the argument: """
        """'data.path="~/corpus.txt"'""",
    ),
    "train-trainer-arg-of-a-wrong-type": train(
        "trainer.max_steps=abc", message="trainer.max_steps='abc' must be an integer"
    ),
    "train-n-embd-not-divisible-by-n-head": train(
        "model.n_head=5", message="model.n_embd=32 is not divisible by model.n_head=5; pick n_head"
    ),
    "train-negative-lr": train("optim.lr=-0.1", message="optim.lr=-0.1 must be > 0"),
    "train-doc-mask-with-characters": train(
        "data.doc_mask=true",
        message="data.doc_mask=true needs an end-of-text token between documents, and data.tokenizer=char "
        "separates them by a blank line",
    ),
    "train-block-size-larger-than-data": train(
        "model.block_size=5000", message="val split has 4000 tokens, fewer than block_size+2 = 5002; use more"
    ),
    "train-empty-corpus": train("data.path={inputs}/empty.txt", message="empty.txt) is empty; give it"),
    "train-missing-corpus": train("data.path={inputs}/missing.txt", message="missing.txt' does not exist"),
    "train-missing-checkpoint": train(
        "ckpt_path={inputs}/missing.ckpt", message="missing.ckpt does not exist"
    ),
    "train-corrupt-checkpoint": train(
        "ckpt_path={inputs}/garbage.ckpt",
        message="garbage.ckpt is not a checkpoint (not the zip archive torch.save writes",
    ),
    "train-checkpoint-of-another-vocabulary": train(
        "data.tokenizer=r50k_base",
        # The run's newest checkpoint: last.ckpt, or best-step=4.ckpt written after it at the same step.
        message="ckpt was trained with a 58-character vocabulary but this run's data.tokenizer gives "
        "tokenizer 'r50k_base'; resume with",
    ),
    "train-checkpoint-of-another-shape": train(
        "model.n_layer=3", message="ckpt holds a model of another shape (model.n_layer=2 in it, 3 now)"
    ),
    "train-unknown-tokenizer": train(
        "data.tokenizer=nope", message="unknown tokenizer 'nope'; use 'char' or"
    ),
    "train-tokenizer-not-loadable-offline": train(
        "data.tokenizer=cl100k_base", message="could not load tiktoken encoding 'cl100k_base'", env=OFFLINE
    ),
    # On a GPU machine the message names the GPUs, else the CPU cores.
    "train-more-devices-than-exist": train("trainer.devices=1000", message="trainer.devices=1000 "),
    "train-gpu-on-a-machine-without-one": pytest.param(
        train("trainer.accelerator=gpu", message="trainer.accelerator=gpu but torch finds no CUDA GPU"),
        marks=NO_GPU,
    ),
    # train.py in a new run dir: what fails after Hydra made it must take it away again
    "new-run-invalid-value": new_run("model.n_head=5", message="model.n_embd=32 is not divisible by"),
    "new-run-trainer-arg-of-a-wrong-type": new_run(
        "trainer.max_steps=abc", message="trainer.max_steps='abc' must be an integer"
    ),
    "new-run-missing-corpus": new_run(
        "data.path={inputs}/missing.txt", message="missing.txt' does not exist"
    ),
    "new-run-empty-corpus": new_run("data.path={inputs}/empty.txt", message="empty.txt) is empty; give it"),
    "new-run-block-size-larger-than-data": new_run(
        "model.block_size=5000", message="fewer than block_size+2"
    ),
    "new-run-unknown-tokenizer": new_run("data.tokenizer=nope", message="unknown tokenizer 'nope'"),
    "new-run-folder-of-files-no-glob-takes": new_run(
        "data.path={inputs}/sas", message="it holds *.sas (2 files): to read them, 'data.include=[*.sas]'"
    ),
    "new-run-tokenizer-not-loadable-offline": new_run(
        "data.tokenizer=cl100k_base", message="could not load tiktoken encoding 'cl100k_base'", env=OFFLINE
    ),
    "new-run-missing-checkpoint": new_run("ckpt_path={inputs}/missing.ckpt", message="missing.ckpt does not"),
    "new-run-checkpoint-of-another-shape": new_run(
        f"ckpt_path={RUN}", "model.n_layer=3", message="holds a model of another shape (model.n_layer=2 in it"
    ),
    "new-run-more-devices-than-exist": new_run("trainer.devices=1000", message="trainer.devices=1000 "),
    "new-run-init-from-missing": new_run(
        "init_from={inputs}/missing", message="init_from={inputs}/missing does not exist; pass a run dir"
    ),
    "new-run-init-from-another-shape": new_run(
        *("init_from={run}", "model.n_layer=3"),
        message="model.n_layer=3 but init_from={run} has n_layer=2; leave out model.n_layer",
    ),
    "new-run-init-from-another-tiktoken-encoding": new_run(
        *("init_from={inputs}/bpe.ckpt", "data.tokenizer=cl100k_base"),
        message="data.tokenizer=cl100k_base but init_from={inputs}/bpe.ckpt was trained with r50k_base; "
        "set data.tokenizer=r50k_base",
    ),
    "new-run-init-from-character-outside-vocabulary": new_run(
        *("init_from={run}", "data.path={inputs}/accented.txt"),
        message="accented.txt holds '\u00e9' (U+00E9), a character not in the checkpoint's 58-character",
    ),
    # train.py data=pairs: the rows, the template, the options, the checkpoint to fine-tune
    "pairs-row-not-json": pairs(
        "data.path={inputs}/not-json.jsonl", message="not-json.jsonl:2 is not JSON ("
    ),
    "pairs-row-without-completion": pairs(
        "data.path={inputs}/no-completion.jsonl",
        message="no-completion.jsonl:2 has none of the paired formats' fields (prompt/completion, "
        "instruction/output, source/target, messages; it has 'prompt'); map yours with data.fields",
    ),
    "pairs-not-jsonl": pairs(
        "data.path={corpus}", message="corpus.txt is not a .jsonl file; paired data is JSON lines"
    ),
    "pairs-template-unknown-placeholder": pairs(
        "data.template='Q: {{question}}'",
        message="template 'Q: {{question}}' is neither one of none, plain, alpaca, chatml nor a format "
        "string over {{prompt}}",
    ),
    "pairs-doc-mask": pairs(
        "data.doc_mask=true", message="data.doc_mask=true is for text corpora; data=pairs already packs"
    ),
    "pairs-prefix-lm-without-mask-prompt": pairs(
        "model.prefix_lm=true",
        "data.mask_prompt=false",
        message="model.prefix_lm=true needs data.mask_prompt=true",
    ),
    "pairs-encoder-decoder-without-mask-prompt": pairs(
        "model.arch=encoder_decoder",
        "data.mask_prompt=false",
        message="data.mask_prompt=false trains on the prompt tokens, which model.arch=encoder_decoder reads",
    ),
    "pairs-encoder-decoder-prefix-lm": pairs(
        "model.arch=encoder_decoder",
        "model.prefix_lm=true",
        message="model.prefix_lm=true is a decoder-only option",
    ),
    "pairs-init-from-decoder-into-encoder-decoder": pairs(
        *("init_from={run}", "model.arch=encoder_decoder"),
        message="model.arch=encoder_decoder but init_from={run} has arch=decoder; leave out model.arch",
    ),
    "train-encoder-decoder-on-text": train(
        "model.arch=encoder_decoder",
        message="model.arch=encoder_decoder trains on prompt -> completion pairs (data=pairs), not on "
        "data=text",
    ),
    "train-encoder-layers-without-encoder": train(
        "model.n_enc_layer=2",
        message="model.n_enc_layer=2 counts an encoder's blocks, and model.arch=decoder",
    ),
    "train-unknown-arch": train(
        "model.arch=encoder", message="model.arch='encoder' is not one of decoder, encoder_decoder"
    ),
    "pairs-init-from-tiktoken-with-char": pairs(
        *("init_from={inputs}/bpe.ckpt", "data.tokenizer=char"),
        message="data.tokenizer=char but init_from={inputs}/bpe.ckpt was trained with r50k_base; "
        "set data.tokenizer=r50k_base",
    ),
    "pairs-init-from-char-with-tiktoken": pairs(
        *("init_from={run}", "data.tokenizer=r50k_base"),
        message="data.tokenizer=r50k_base but init_from={run} was trained with char; set data.tokenizer=char",
    ),
    "pairs-init-from-character-outside-vocabulary": pairs(
        "init_from={run}",
        message="pairs.jsonl:1 holds '4' (U+0034), a character not in the 58-character vocabulary of the "
        "model being fine-tuned; remove or replace it in that row",
    ),
    # generate.py: the sampling knobs, the checkpoint, the prompt, the device
    "generate-unknown-key": generate("tempreature=0.5", message="Key 'tempreature' not in 'GenerateConfig'"),
    "generate-wrong-type": generate(
        "top_k=many", message="Value 'many' of type 'str' could not be converted"
    ),
    "generate-negative-temperature": generate("temperature=-1", message="temperature=-1.0 must be >= 0"),
    "generate-top-p-zero": generate("top_p=0", message="top_p=0.0 must be in (0, 1]"),
    "generate-top-p-above-one": generate("top_p=1.5", message="top_p=1.5 must be in (0, 1]"),
    "generate-top-k-zero": generate("top_k=0", message="top_k=0 must be >= 1"),
    "generate-max-new-tokens-zero": generate("max_new_tokens=0", message="max_new_tokens=0 must be >= 1"),
    "generate-missing-checkpoint": generate(
        "ckpt={inputs}/missing.ckpt", message="missing.ckpt does not exist"
    ),
    "generate-corrupt-checkpoint": generate(
        "ckpt={inputs}/garbage.ckpt", message="garbage.ckpt is not a checkpoint (not the zip archive"
    ),
    "generate-truncated-checkpoint": generate(
        "ckpt={inputs}/truncated.ckpt", message="truncated.ckpt is not a checkpoint (not the zip archive"
    ),
    "generate-checkpoint-of-another-vocabulary": generate(
        "ckpt={inputs}/other-vocabulary.ckpt", message="its tokenizer has 100 tokens but its model only"
    ),
    "generate-character-outside-vocabulary": generate(
        'prompt="ROMEO§"', message="character '§' (U+00A7) is not in this model's 58-character vocabulary"
    ),
    # A prompt Hydra cannot read (prompt="..." reaches it without the shell's quotes): the forms that
    # take any text.
    "generate-prompt-with-commas": generate(
        "prompt=July 4, 1776",
        message="""'prompt=July 4, 1776' (Hydra reads its commas as a list of values); put the value in """
        """quotes inside the argument: 'prompt="July 4, 1776"', or for any text, quotes and apostrophes """
        """included: prompt=- reads it from stdin (echo "July 4, 1776" | python generate.py prompt=-), """
        "prompt_file=FILE from a file (one per line)",
    ),
    "generate-prompt-with-an-apostrophe": generate(
        "prompt=it's",
        message="""could not parse the override "prompt=it's"; for any text, quotes and apostrophes """
        """included: prompt=- reads it from stdin (echo "it's" | python generate.py prompt=-), """
        "prompt_file=FILE from a file (one per line)",
    ),
    # On a GPU machine the message names its GPUs, else it says there are none.
    "generate-more-devices-than-exist": generate("device=cuda:99", message="device=cuda:99 but"),
    # prepare
    "prepare-unknown-key": command(
        "prepare.py", "data.tokenizr=char", message="Key 'tokenizr' not in 'DataConfig'"
    ),
    "prepare-unknown-data-preset": command(
        "prepare.py", "data=wikitext", message="there is no data=wikitext; choose one of hf,"
    ),
    "prepare-text-without-path": command(
        "prepare.py", "data=text", "data.cache_dir={cache}", message="data=text needs a corpus"
    ),
    "prepare-empty-corpus": command(
        *("prepare.py", "data=text", "data.path={inputs}/empty.txt", "data.tokenizer=char"),
        "data.cache_dir={cache}",
        message="empty.txt) is empty; give it some text",
    ),
    "prepare-not-utf8": command(
        *("prepare.py", "data=text", "data.path={inputs}/latin1.txt", "data.tokenizer=char"),
        "data.cache_dir={cache}",
        message="latin1.txt is not UTF-8 text (bad byte near offset 2)",
    ),
    # A folder: its files match no glob (the line gives the override that reads them), or none is text.
    "prepare-folder-of-files-no-glob-takes": command(
        *("prepare.py", "data=text", "data.path={inputs}/sas", "data.cache_dir={cache}"),
        message="no files under {inputs}/sas match data.include (the default: common text and "
        "source-code extensions, listed in docs/data.md); it holds *.sas (2 files): to read them, "
        "'data.include=[*.sas]'",
    ),
    "prepare-folder-without-utf8": command(
        *("prepare.py", "data=text", "data.path={inputs}/latin1-code", "data.cache_dir={cache}"),
        message="the one file under {inputs}/latin1-code that data.include takes is not UTF-8 text (old.py: "
        "not UTF-8 near offset 3); convert it to UTF-8, or choose others with data.include",
    ),
    "prepare-tokenizer-not-loadable-offline": command(
        *("prepare.py", "data=text", "data.path={corpus}", "data.tokenizer=cl100k_base"),
        "data.cache_dir={cache}",
        message="could not load tiktoken encoding 'cl100k_base'",
        env=OFFLINE,
    ),
    # prepare, train: data.tokenizer=train (a BPE trained on the corpus)
    "prepare-trained-tokenizer-vocabulary-too-small": command(
        *("prepare.py", "data=text", "data.path={corpus}", "data.tokenizer=train", "data.vocab_size=200"),
        "data.cache_dir={cache}",
        message="data.vocab_size=200 is too small for a byte-level BPE: its 256 byte tokens and 1 special "
        "token take 257; use data.vocab_size=257 or more",
    ),
    "prepare-trained-tokenizer-special-tokens-too-many": command(
        *("prepare.py", "data=text", "data.path={corpus}", "data.tokenizer=train", "data.vocab_size=257"),
        *("data.special_tokens=['<|user|>']", "data.cache_dir={cache}"),
        message="data.vocab_size=257 is too small for a byte-level BPE: its 256 byte tokens and 2 special "
        "tokens take 258; use data.vocab_size=258 or more",
    ),
    "prepare-trained-tokenizer-repeated-special-token": command(
        *("prepare.py", "data=text", "data.path={corpus}", "data.tokenizer=train"),
        *("data.special_tokens=['<|endoftext|>']", "data.cache_dir={cache}"),
        message="repeats a token (<|endoftext|> is always the first); list each other one once",
    ),
    "prepare-trained-tokenizer-unknown-pattern": command(
        *("prepare.py", "data=text", "data.path={corpus}", "data.tokenizer=train", "data.bpe_pattern=gpt3"),
        "data.cache_dir={cache}",
        message="data.bpe_pattern='gpt3' is not one of gpt4, gpt2",
    ),
    "prepare-trained-tokenizer-empty-corpus": command(
        *("prepare.py", "data=text", "data.path={inputs}/empty.txt", "data.tokenizer=train"),
        "data.cache_dir={cache}",
        message="empty.txt) is empty; give it some text",
    ),
    "prepare-trained-tokenizer-not-utf8": command(
        *("prepare.py", "data=text", "data.path={inputs}/latin1.txt", "data.tokenizer=train"),
        "data.cache_dir={cache}",
        message="latin1.txt is not UTF-8 text (bad byte near offset 2)",
    ),
    "new-run-trained-tokenizer-vocabulary-too-small": new_run(
        "data.tokenizer=train",
        "data.vocab_size=100",
        message="data.vocab_size=100 is too small for a byte-level",
    ),
    "new-run-trained-tokenizer-empty-corpus": new_run(
        "data.path={inputs}/empty.txt", "data.tokenizer=train", message="empty.txt) is empty; give it"
    ),
    "pairs-trained-tokenizer": pairs(
        "data.tokenizer=train",
        message="data.tokenizer=train trains a tokenizer on a text corpus (data=text, shakespeare or "
        "hf), not on pairs; fine-tune a model trained with one (init_from=RUN), or use char or a tiktoken",
    ),
    # export: an earlier export is in {export}
    "export-without-out": command("export.py", "ckpt={rope}", message="say where to write the export"),
    "export-unknown-format": command(
        *("export.py", "ckpt={rope}", "out={export}", "format=onnx"),
        message="unknown export format 'onnx'",
    ),
    "export-missing-checkpoint": command(
        *("export.py", "ckpt={inputs}/missing.ckpt", "out={export}"),
        message="missing.ckpt does not exist",
    ),
    "export-model-without-hf-equivalent": command(
        *("export.py", "ckpt={run}", "out={export}"), message="norm=rmsnorm cannot be exported in gpt2"
    ),
    "export-checkpoint-of-another-vocabulary": command(
        *("export.py", "ckpt={inputs}/other-vocabulary.ckpt", "out={export}"),
        message="its tokenizer has 100 tokens but its model only vocab_size=58",
    ),
    "export-out-is-a-file": command(
        *("export.py", "ckpt={rope}", "out={inputs}/empty.txt"),
        message="empty.txt is a file; pass a folder",
    ),
    # compare: an earlier plot is in {plots}
    "compare-no-runs": command(
        "compare.py", message="say which runs to compare: python compare.py runs=[DIR,...]"
    ),
    "compare-missing-run": command("compare.py", "runs=[{inputs}/missing]", message="missing does not exist"),
    "compare-plot-format": command(
        *("compare.py", "runs=[{run}]", "out={plots}/compare.txt"), message="cannot write a .txt plot"
    ),
    "compare-corrupt-checkpoint": command(
        *("compare.py", "runs=[{broken}/checkpoint]", "out={plots}/compare.png"),
        message="last.ckpt is not a checkpoint (not the zip archive torch.save writes",
    ),
    "compare-corrupt-log": command(
        *("compare.py", "runs=[{broken}/log]", "out={plots}/compare.png"), message="csv/ is not readable"
    ),
    # serve.py: refused before the model is loaded or a port is taken
    "serve-port-out-of-range": command(
        "serve.py", "ckpt={run}", "port=70000", message="port=70000 must be in"
    ),
    "serve-no-batch": command("serve.py", "ckpt={run}", "max_batch=0", message="max_batch=0 must be >= 1"),
    "serve-empty-key": command("serve.py", "ckpt={run}", "api_key=''", message="api_key must not be empty"),
    "serve-bad-template": command(
        "serve.py", "ckpt={run}", "template=Q:", message="template 'Q:' is neither one of none, plain"
    ),
    "serve-missing-checkpoint": command(
        "serve.py", "ckpt={inputs}/missing.ckpt", message="missing.ckpt does not exist"
    ),
    # the benchmarks: refused before anything is generated or timed
    "bench-train-no-warmup": command("bench/bench_train.py", "warmup=0", message="each must be >= 1"),
    "bench-generate-no-repeats": command("bench/bench_generate.py", "repeats=0", message="each must be >= 1"),
    "bench-serve-no-clients": command("bench/bench_serve.py", "clients=[]", message="each must be >= 1"),
    "bench-prepare-negative-size": command("bench/bench_prepare.py", "mb=-1", message="mb must be > 0"),
}


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> dict[str, str]:
    """A folder with one finished tiny run and everything the cases read; returns the paths the
    cases' {placeholders} stand for. Commands run in it (cwd), so a stray output shows up too."""
    root = tmp_path_factory.mktemp("bad-input")
    paths = {name: str(root / name) for name in ("run", "cache", "inputs", "export", "plots", "broken")}
    corpus = write_corpus(root / "corpus.txt")
    paths["corpus"] = str(corpus)
    fill = lambda args: [a.format(**paths) for a in args]  # noqa: E731

    proc = run_forked(*fill(TRAIN), cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = Path(paths["run"], "checkpoints", "last.ckpt")
    # The r50k_base tokens of the corpus, so that train-checkpoint-of-another-vocabulary finds them
    # prepared and reaches the checkpoint.
    prepare(DataConfig(source="text", path=str(corpus), tokenizer="r50k_base", cache_dir=paths["cache"]))

    inputs = Path(paths["inputs"])
    (inputs / "empty-tiktoken-cache").mkdir(parents=True)
    (inputs / "empty.txt").write_text("")
    (inputs / "latin1.txt").write_bytes("ab\xe9cd".encode("latin-1"))
    for rel, content in (
        ("sas/a.sas", b"data x;\n"),
        ("sas/b.sas", b"run;\n"),
        ("latin1-code/old.py", b"caf\xe9 = 1\n"),
    ):
        (inputs / rel).parent.mkdir(parents=True, exist_ok=True)
        (inputs / rel).write_bytes(content)
    (inputs / "accented.txt").write_text("caf\u00e9\n" * 1000, encoding="utf-8")
    rows = ['{"prompt": "42", "completion": "forty-two"}', '{"prompt": "7", "completion": "seven"}']
    (inputs / "pairs.jsonl").write_text("\n".join(rows) + "\n")
    (inputs / "not-json.jsonl").write_text(rows[0] + "\n{oops\n")
    (inputs / "no-completion.jsonl").write_text(rows[0] + '\n{"prompt": "7"}\n')
    r50k = TiktokenTokenizer("r50k_base")
    save_weights_checkpoint(tiny_model(vocab_size=r50k.vocab_size), r50k, inputs / "bpe.ckpt")
    (inputs / "garbage.ckpt").write_bytes(bytes(range(256)) * 8)
    (inputs / "truncated.ckpt").write_bytes(ckpt.read_bytes()[:20_000])
    other = torch.load(ckpt, weights_only=True)
    other["hyper_parameters"]["tokenizer"] = {"kind": "char", "chars": "".join(map(chr, range(256, 356)))}
    torch.save(other, inputs / "other-vocabulary.ckpt")

    # An exportable model (rope, rmsnorm, swiglu: the Llama format) and an earlier export of it.
    tokenizer = CharTokenizer.from_text(corpus.read_text(encoding="utf-8"))
    model = tiny_model(pos_emb="rope", vocab_size=tokenizer.vocab_size)
    paths["rope"] = str(save_weights_checkpoint(model, tokenizer, inputs / "rope.ckpt"))
    export(model, tokenizer, paths["export"])

    # An earlier plot, and copies of the run with one of the files compare reads broken.
    Path(paths["plots"]).mkdir()
    (Path(paths["plots"]) / "compare.png").write_bytes(b"an earlier plot")
    broken = Path(paths["broken"])
    for name, file, content in (
        ("checkpoint", "checkpoints/last.ckpt", ckpt.read_bytes()[:3000]),
        ("log", "csv/version_0/metrics.csv", b"step,train/loss\n0,nan?\n"),
    ):
        shutil.copytree(paths["run"], broken / name)
        (broken / name / file).write_bytes(content)

    paths["closed_port"] = str(free_port())
    paths["root"] = str(root)
    return paths


# train.py holds <run dir>/train.lock while it runs and writes its pid there (gpt.train.rundir.RunLock):
# the file must stay, but naming the last process that held the lock is what it is for.
LOCK = "run/train.lock"


def snapshot(root: Path) -> dict[str, str]:
    """Every path under root: a file's sha256, or "dir"."""
    return {
        rel: "lock" if rel == LOCK else hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(root.rglob("*"))
        if (rel := str(p.relative_to(root)))
    }


def changes(before: dict[str, str], after: dict[str, str]) -> list[str]:
    return sorted(
        [f"added {p}" for p in after.keys() - before.keys()]
        + [f"removed {p}" for p in before.keys() - after.keys()]
        + [f"changed {p}" for p in before.keys() & after.keys() if before[p] != after[p]]
    )


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_bad_input_is_one_line_exit_2_and_changes_nothing(case: Case, work: dict[str, str]):
    root = Path(work["root"])
    args = [a.format(**work) for a in case.args]
    env = {k: v.format(**work) for k, v in case.env.items()}
    before = snapshot(root)
    # timeout: offline cases must not wait on the network
    proc = run_forked(*args, cwd=root, env=env, timeout=60)
    after = snapshot(root)

    report = f"stdout:\n{proc.stdout[-2000:]}\nstderr:\n{proc.stderr[-4000:]}"
    assert proc.returncode == EXIT_USER_ERROR, report
    assert "Traceback" not in proc.stderr, report
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: "), report
    assert [line for line in lines if line.startswith("error:")] == [lines[-1]], report
    assert case.message.format(**work) in lines[-1], report
    assert changes(before, after) == [], report
