"""Typed configs. Hydra's ConfigStore uses these as schemas; validation lives in __post_init__.

Nothing here imports hydra or omegaconf: the entry points convert their DictConfig into these
dataclasses (OmegaConf.to_object runs __post_init__), and the library only sees dataclasses.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

from gpt.errors import ConfigError

POS_EMBS = ("learned", "sinusoidal", "rope")
NORMS = ("layernorm", "rmsnorm")
FFNS = ("swiglu", "gelu", "relu2")
ARCHS = ("decoder", "encoder_decoder")
SCHEDULES = ("cosine", "wsd", "constant")
OPTIMIZERS = ("adamw", "muon")
MUON_NS_DTYPES = ("auto", "float32", "bfloat16")


def _check(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(msg)


def _one_of(name: str, value: str, choices: tuple[str, ...]) -> None:
    _check(value in choices, f"{name}={value!r} is not one of {', '.join(choices)}")


def _home(path: str | None) -> str | None:
    """`~` at the start of a path is the home folder, as in a shell. Hydra's parser refuses an
    unquoted `~` in a value ('data.path="~/corpus"' gets past it), and a shell leaves one after
    `data.path=` as it is, so nothing else expands it."""
    return os.path.expanduser(path) if path else path


@dataclass
class ModelConfig:
    # Transformer blocks.
    n_layer: int = 4
    # Attention heads; must divide n_embd.
    n_head: int = 4
    # Width of the residual stream.
    n_embd: int = 128
    # Context length in tokens: the longest sequence the model attends to.
    block_size: int = 64
    # None until the tokenizer is known: train.py fills it from the prepared data.
    vocab_size: int | None = None
    # learned, sinusoidal (fixed) or rope (rotary, applied to queries and keys).
    pos_emb: str = "learned"
    # rmsnorm or layernorm: pre-norm in every block, and a final norm.
    norm: str = "rmsnorm"
    # swiglu, gelu (GPT-2's MLP) or relu2 (the same MLP with relu(x)**2, as in the modded-nanogpt
    # speedrun and Primer).
    ffn: str = "swiglu"
    # FFN hidden width; None = 4*n_embd for gelu and relu2, 8/3*n_embd rounded up to a multiple of 64
    # for swiglu (the same parameter count as the 4x MLP).
    ffn_hidden: int | None = None
    # Biases in the linear layers and LayerNorm.
    bias: bool = False
    # On embeddings, attention weights and residual branches.
    dropout: float = 0.0
    # The LM head shares the token embedding's weights.
    tie_embeddings: bool = True
    # Epsilon of the norms.
    norm_eps: float = 1e-5
    # RMSNorm of each head's queries and keys before attention (and before rotary positions), as in
    # Qwen3, OLMo 2 and the modded-nanogpt speedrun.
    qk_norm: bool = False
    # Logits capped smoothly at +-c: c * tanh(logits / c), in training's loss and in generation alike
    # (Gemma 2; modded-nanogpt used 30, then 15). None: uncapped.
    logit_softcap: float | None = None
    # The projections that write into the residual stream (attention's and the FFN's c_proj) start at
    # zero, so every block starts as the identity (modded-nanogpt).
    zero_init_proj: bool = False
    # A second token embedding whose vectors are mixed into every layer's attention values, with two
    # learned scalars per layer: v = a * v + b * embedding (modded-nanogpt). Adds vocab_size * n_embd
    # parameters.
    value_embeds: bool = False
    # RoPE frequency base.
    rope_base: float = 10000.0
    # Std of the normal init; projections into the residual stream get init_std / sqrt(2 n_layer).
    init_std: float = 0.02
    # Prefix LM: the prompt (each example's, or generation's) attends both ways; the rest is causal.
    prefix_lm: bool = False
    # decoder (decoder-only, GPT) or encoder_decoder (the original Transformer's: an encoder reads the
    # prompt both ways, the decoder writes the completion with cross-attention to it; data=pairs only).
    arch: str = "decoder"
    # encoder_decoder: the encoder's blocks (n_layer counts the decoder's); None = n_layer.
    n_enc_layer: int | None = None
    # encoder_decoder: the token that starts every decoder input (train.py sets it to the
    # tokenizer's end-of-text token, as BART starts with its end-of-sequence token).
    decoder_start: int | None = None

    def __post_init__(self) -> None:
        for name in ("n_layer", "n_head", "n_embd", "block_size"):
            _check(getattr(self, name) >= 1, f"model.{name}={getattr(self, name)} must be >= 1")
        _check(
            self.n_embd % self.n_head == 0,
            f"model.n_embd={self.n_embd} is not divisible by model.n_head={self.n_head}; "
            "pick n_head that divides n_embd",
        )
        _one_of("model.pos_emb", self.pos_emb, POS_EMBS)
        _one_of("model.norm", self.norm, NORMS)
        _one_of("model.ffn", self.ffn, FFNS)
        if self.pos_emb == "rope":
            _check(self.head_dim % 2 == 0, f"rope needs an even head size, got {self.head_dim}")
        _check(0.0 <= self.dropout < 1.0, f"model.dropout={self.dropout} must be in [0, 1)")
        _check(self.vocab_size is None or self.vocab_size >= 1, f"model.vocab_size={self.vocab_size} < 1")
        _check(self.ffn_hidden is None or self.ffn_hidden >= 1, f"model.ffn_hidden={self.ffn_hidden} < 1")
        _check(
            self.logit_softcap is None or self.logit_softcap > 0,
            f"model.logit_softcap={self.logit_softcap} must be > 0 (or null: no cap)",
        )
        _one_of("model.arch", self.arch, ARCHS)
        _check(
            self.arch == "encoder_decoder" or self.n_enc_layer is None,
            f"model.n_enc_layer={self.n_enc_layer} counts an encoder's blocks, and model.arch=decoder has "
            "none; set model.arch=encoder_decoder, or leave n_enc_layer out",
        )
        if self.arch == "encoder_decoder":
            _check(
                self.n_enc_layer is None or self.n_enc_layer >= 1,
                f"model.n_enc_layer={self.n_enc_layer} must be >= 1 (or null: n_layer)",
            )
            _check(
                not self.value_embeds,
                "model.value_embeds=true is a decoder-only option here; leave it out with "
                "model.arch=encoder_decoder",
            )
            _check(
                not self.prefix_lm,
                "model.prefix_lm=true is a decoder-only option (the prompt read both ways inside the "
                "decoder); model.arch=encoder_decoder reads the prompt both ways with its encoder already",
            )

    @property
    def encoder_layers(self) -> int:
        """The encoder's blocks: 0 for a decoder-only model."""
        if self.arch != "encoder_decoder":
            return 0
        return self.n_layer if self.n_enc_layer is None else self.n_enc_layer

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def hidden_dim(self) -> int:
        if self.ffn_hidden is not None:
            return self.ffn_hidden
        if self.ffn in ("gelu", "relu2"):
            return 4 * self.n_embd
        return -(-8 * self.n_embd // 3 // 64) * 64


# The ModelConfig fields that decide which weights a model has and their shapes: a checkpoint's
# weights fit a model only if these agree (dropout, norm_eps, rope_base, init_std, zero_init_proj and
# logit_softcap do not).
ARCHITECTURE = (
    "n_layer", "n_head", "n_embd", "block_size", "vocab_size", "pos_emb", "norm", "ffn", "ffn_hidden",
    "bias", "tie_embeddings", "arch", "n_enc_layer", "qk_norm", "value_embeds",
)  # fmt: skip


# What a folder is searched for (paths relative to the folder, fnmatch-style: `*` crosses `/`): prose
# and markup, JSON lines (a document per line), and source code with its build and config files (a
# document per file). docs/data.md lists them; files among these that are not UTF-8 text are skipped.
TEXT_EXTENSIONS = ("txt", "md", "markdown", "rst", "adoc", "org", "tex")
CODE_EXTENSIONS = (
    "py", "pyi", "c", "h", "cc", "cpp", "cxx", "hpp", "hh", "cu", "cs", "java", "kt", "scala", "go",
    "rs", "swift", "m", "mm", "js", "jsx", "mjs", "cjs", "ts", "tsx", "vue", "svelte", "rb", "php",
    "pl", "pm", "lua", "r", "R", "jl", "hs", "ml", "mli", "ex", "exs", "erl", "clj", "dart", "zig",
    "nim", "sh", "bash", "zsh", "fish", "ps1", "sql", "html", "htm", "css", "scss", "sass", "less",
    "yaml", "yml", "toml", "ini", "cfg", "proto", "cmake", "gradle",
)  # fmt: skip
CODE_FILE_NAMES = ("Makefile", "Dockerfile")
DEFAULT_INCLUDE = (
    *(f"*.{e}" for e in TEXT_EXTENSIONS),
    *("*.jsonl", "*.txt.gz", "*.md.gz", "*.jsonl.gz"),
    *(f"*.{e}" for e in CODE_EXTENSIONS),
    *(g for name in CODE_FILE_NAMES for g in (name, f"*/{name}")),
)
# What a folder's search leaves out: hidden files and folders (.git, .venv) and installed packages
# (node_modules, site-packages), which would outweigh a project's own code.
DEFAULT_EXCLUDE = (".*", "*/.*", "node_modules/*", "*/node_modules/*", "site-packages/*", "*/site-packages/*")
SOURCES = ("shakespeare", "text", "hf", "pairs")
# The fields of paired rows (gpt.data.pairs), which data.fields can map to a file's own names.
PAIR_FIELDS = (
    "prompt", "completion", "instruction", "input", "output", "source", "target",
    "messages", "role", "content",
)  # fmt: skip
# The fields of multiple-choice rows (evaluate task=mc), which data.fields can map likewise.
CHOICE_FIELDS = ("context", "choices", "label")
SAMPLINGS = ("random", "sequential")
# data.tokenizer=train: a byte-level BPE trained on the corpus, cut into pieces by one of these
# patterns (gpt.tokenizer.SPLIT_PATTERNS holds them), with <|endoftext|> its first special token.
TRAIN_TOKENIZER = "train"
BPE_PATTERNS = ("gpt4", "gpt2")
ENDOFTEXT = "<|endoftext|>"


@dataclass
class DataConfig:
    # "shakespeare" finds/downloads Tiny Shakespeare; "text" reads `path` (a file or a directory);
    # "hf" reads a Hugging Face dataset (`path`: a Hub name or a folder from save_to_disk);
    # "pairs" reads prompt -> completion rows from .jsonl files at `path` (see docs/finetuning.md).
    source: str = "shakespeare"
    # text: a file or a folder; hf: a dataset name on the Hub or a folder from save_to_disk.
    path: str | None = None
    # Which files of a folder are read (globs on the path relative to it): common text and
    # source-code extensions (docs/data.md), or your own, e.g. 'data.include=[*.py]'.
    include: list[str] = field(default_factory=lambda: list(DEFAULT_INCLUDE))
    # Which of those are skipped: hidden files and folders, node_modules, site-packages; setting it
    # replaces these, e.g. 'data.exclude=[.*,*/.*,drafts/*,*.log.md]'.
    exclude: list[str] = field(default_factory=lambda: list(DEFAULT_EXCLUDE))
    # The field holding the text in .jsonl lines and dataset rows.
    text_field: str = "text"
    # hf: the dataset's configuration name.
    hf_config: str | None = None
    # hf: the dataset split read.
    hf_split: str = "train"
    # "char" builds a character vocabulary from the corpus; "train" trains a byte-level BPE on the
    # corpus's training split (vocab_size, bpe_pattern, special_tokens); anything else is a tiktoken
    # encoding name.
    tokenizer: str = "char"
    # tokenizer=train: the tokens of the vocabulary, its 256 bytes and special tokens included (fewer
    # when the corpus runs out of pairs to merge).
    vocab_size: int = 16_384
    # tokenizer=train: how text is cut into pieces before BPE (no token crosses two): gpt4 (GPT-4's
    # cl100k_base pattern: up to 3 digits a piece, runs of spaces and newlines apart) or gpt2.
    bpe_pattern: str = "gpt4"
    # tokenizer=train: special tokens after <|endoftext|> (always the first), such as
    # "data.special_tokens=['<|user|>','<|assistant|>']"; text never encodes to them.
    special_tokens: list[str] = field(default_factory=list)
    # Where a named corpus is looked for (and downloaded to when missing); None: env GPT_DATA_DIR,
    # else ./data.
    root: str | None = None
    # Where tokenized corpora are cached.
    cache_dir: str = "data/cache"
    # Expected share of documents held out for validation, drawn with split_seed.
    val_fraction: float = 0.1
    # Seeds which documents (parts) are held out for validation.
    split_seed: int = 0
    # Documents longer than this many characters are cut at a line break into parts, which are split
    # and tokenized separately (a single-file corpus such as Tiny Shakespeare still gets a val split).
    doc_chars: int = 32_768
    # Tokens per shard file (the last shard of a split is shorter).
    shard_tokens: int = 1 << 27
    # Tokenizer threads while preparing; None = one per CPU core.
    prepare_workers: int | None = None
    # Windows per batch, per device.
    batch_size: int = 16
    # DataLoader worker processes (each maps the shards once). None: auto, decided by the trainer's
    # device: 0 on a CPU (the batches cost microseconds); on a GPU min(4, the usable CPU cores per
    # device on this machine less one), at least 1, so the next batches are read while the GPU computes.
    num_workers: int | None = None
    # "random": windows at uniformly random offsets; "sequential": back-to-back windows, in order,
    # every token once per epoch.
    sampling: str = "random"
    # pairs: how a row becomes text: none, plain (prompt, line break, completion), alpaca, chatml,
    # or a format string over {prompt} such as 'Q: {prompt}\nA: '. Saved with the checkpoint.
    template: str = "plain"
    # pairs: the file's field names, by ours (prompt, completion, instruction, input, output, source,
    # target, messages, role, content), e.g. 'data.fields={prompt: question, completion: answer}';
    # for evaluate task=mc: context, choices, label.
    # (Any and null by default: Hydra refuses new keys in a typed mapping, even an empty one.)
    fields: Any = None
    # pairs: the loss covers only the completions (the targets on prompt tokens are ignored).
    mask_prompt: bool = True
    # pairs: several examples share a row of block_size tokens, each attending only to itself;
    # false: one example per row, padded.
    packing: bool = True
    # Text corpora: each document of a window attends only to itself, its positions counted from its
    # start (its end-of-text token, which comes first); random windows start at a document start
    # where one lies in them (docs/data.md, "Document masks"). Needs a BPE tokenizer: char's "\n\n"
    # separator also occurs inside text.
    doc_mask: bool = False
    # Windows per validation pass (fixed and evenly spaced, so every validation sees the same windows).
    # None: 512, or 64 on a CPU with a vocabulary of over 4,096 tokens (where each window scores
    # block_size x vocab_size logits: 512 windows of model=small with GPT-2's BPE take minutes).
    val_windows: int | None = None

    def __post_init__(self) -> None:
        self.path, self.root, self.cache_dir = _home(self.path), _home(self.root), _home(self.cache_dir)
        _one_of("data.source", self.source, SOURCES)
        if self.source in ("text", "hf", "pairs"):
            _check(bool(self.path), f"data={self.source} needs a corpus: pass data.path=...")
        _check(0.0 < self.val_fraction < 1.0, f"data.val_fraction={self.val_fraction} must be in (0, 1)")
        _check(self.doc_chars >= 256, f"data.doc_chars={self.doc_chars} must be >= 256")
        _check(self.shard_tokens >= 1024, f"data.shard_tokens={self.shard_tokens} must be >= 1024")
        _check(
            self.prepare_workers is None or self.prepare_workers >= 1,
            f"data.prepare_workers={self.prepare_workers} must be >= 1 (or null)",
        )
        fields = {} if self.fields is None else self.fields
        _check(
            isinstance(fields, Mapping) and all(isinstance(v, str) for v in fields.values()),
            f"data.fields={self.fields!r} must map our field names to yours, e.g. "
            "'data.fields={prompt: question, completion: answer}'",
        )
        self.fields = {str(k): v for k, v in fields.items()}
        unknown = sorted(set(self.fields) - set(PAIR_FIELDS) - set(CHOICE_FIELDS))
        _check(
            not unknown,
            f"data.fields maps {', '.join(unknown)}, which are not among "
            f"{', '.join(PAIR_FIELDS + CHOICE_FIELDS)}",
        )
        _check(bool(self.include), "data.include is empty: give at least one glob such as '*.txt'")
        if self.tokenizer == TRAIN_TOKENIZER:
            self._check_training()
        _check(self.batch_size >= 1, f"data.batch_size={self.batch_size} must be >= 1")
        _check(
            self.num_workers is None or self.num_workers >= 0,
            f"data.num_workers={self.num_workers} must be >= 0 (or null: auto)",
        )
        _one_of("data.sampling", self.sampling, SAMPLINGS)
        _check(
            self.val_windows is None or self.val_windows >= 1,
            f"data.val_windows={self.val_windows} must be >= 1 (or null)",
        )
        if self.doc_mask:
            self._check_doc_mask()

    def _check_doc_mask(self) -> None:
        _check(
            self.source != "pairs",
            "data.doc_mask=true is for text corpora; data=pairs already packs each example into a "
            "segment of its own that attends only to itself: drop data.doc_mask",
        )
        _check(
            self.tokenizer != "char",
            "data.doc_mask=true needs an end-of-text token between documents, and data.tokenizer=char "
            "separates them by a blank line, which also occurs inside text: use a BPE "
            "(data.tokenizer=r50k_base or train) or drop data.doc_mask",
        )

    def _check_training(self) -> None:
        """data.tokenizer=train's knobs."""
        _check(
            self.source != "pairs",
            "data.tokenizer=train trains a tokenizer on a text corpus (data=text, shakespeare or hf), not on "
            "pairs; fine-tune a model trained with one (init_from=RUN), or use char or a tiktoken encoding",
        )
        _one_of("data.bpe_pattern", self.bpe_pattern, BPE_PATTERNS)
        specials = list(self.special_tokens)
        _check(
            all(isinstance(s, str) and s for s in specials),
            f"data.special_tokens={specials!r} must be non-empty strings",
        )
        _check(
            ENDOFTEXT not in specials and len(set(specials)) == len(specials),
            f"data.special_tokens={specials!r} repeats a token ({ENDOFTEXT} is always the first); "
            "list each other one once",
        )
        need = 256 + 1 + len(specials)
        _check(
            self.vocab_size >= need,
            f"data.vocab_size={self.vocab_size} is too small for a byte-level BPE: its 256 byte tokens "
            f"and {len(specials) + 1} special token{'s' * bool(specials)} take {need}; use "
            f"data.vocab_size={need} or more (thousands, to merge anything worth merging)",
        )


@dataclass
class OptimConfig:
    # adamw: AdamW everywhere. muon: Muon for the blocks' 2-D weights, AdamW (lr) for the rest.
    name: str = "adamw"
    # Peak learning rate (of AdamW's parameters under muon).
    lr: float = 1e-3
    # AdamW's decay, applied to matrices and embeddings only (never biases or norms).
    weight_decay: float = 0.1
    # AdamW's first-moment decay.
    beta1: float = 0.9
    # AdamW's second-moment decay.
    beta2: float = 0.95
    # AdamW's epsilon.
    eps: float = 1e-8
    # Linear warmup from lr / warmup_steps to lr.
    warmup_steps: int = 100
    # After warmup: cosine (down to lr * min_lr_ratio), wsd (warmup-stable-decay) or constant.
    schedule: str = "cosine"
    # The cosine decays to lr * min_lr_ratio at decay_steps (None: at trainer.max_steps).
    min_lr_ratio: float = 0.1
    # Step at which the decay reaches its floor; None = trainer.max_steps.
    decay_steps: int | None = None
    # wsd: the share of the horizon spent decaying (after a stable phase at lr).
    decay_fraction: float = 0.2
    # muon: Muon's peak learning rate.
    muon_lr: float = 0.02
    # muon: Muon's momentum.
    muon_momentum: float = 0.95
    # The dtype of Muon's Newton-Schulz iteration. auto: bfloat16 where the parameters' device
    # computes it fast (GPUs from Ampere on, CPUs with AVX-512 BF16 or AMX), else float32.
    muon_ns_dtype: str = "auto"

    def __post_init__(self) -> None:
        _one_of("optim.name", self.name, OPTIMIZERS)
        _check(self.lr > 0, f"optim.lr={self.lr} must be > 0")
        _check(self.muon_lr > 0, f"optim.muon_lr={self.muon_lr} must be > 0")
        _check(0 <= self.muon_momentum < 1, f"optim.muon_momentum={self.muon_momentum} must be in [0, 1)")
        _one_of("optim.muon_ns_dtype", self.muon_ns_dtype, MUON_NS_DTYPES)
        _check(0 < self.decay_fraction <= 1, f"optim.decay_fraction={self.decay_fraction} must be in (0, 1]")
        _check(self.weight_decay >= 0, f"optim.weight_decay={self.weight_decay} must be >= 0")
        for name in ("beta1", "beta2"):
            _check(0 <= getattr(self, name) < 1, f"optim.{name}={getattr(self, name)} must be in [0, 1)")
        _check(self.warmup_steps >= 0, f"optim.warmup_steps={self.warmup_steps} must be >= 0")
        _one_of("optim.schedule", self.schedule, SCHEDULES)
        _check(0 <= self.min_lr_ratio <= 1, f"optim.min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")
        _check(self.decay_steps is None or self.decay_steps >= 1, f"optim.decay_steps={self.decay_steps} < 1")


@dataclass
class SamplingConfig:
    """How the next token is drawn: generate.py's keys, generate_text's keywords, SampleText's."""

    # 0 is greedy (argmax); higher is more random.
    temperature: float = 0.8
    # Sample among the k most likely tokens (None: all).
    top_k: int | None = 200
    # Nucleus sampling: the smallest set of tokens holding this much probability, in (0, 1].
    top_p: float | None = None
    # Drop tokens less likely than min_p times the most likely one, in [0, 1].
    min_p: float | None = None
    # > 1 makes tokens already in the context less likely (CTRL); 1 = off.
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        _check(self.temperature >= 0, f"temperature={self.temperature} must be >= 0 (0 = greedy)")
        _check(self.top_k is None or self.top_k >= 1, f"top_k={self.top_k} must be >= 1 (or null)")
        _check(self.top_p is None or 0 < self.top_p <= 1, f"top_p={self.top_p} must be in (0, 1] (or null)")
        _check(self.min_p is None or 0 <= self.min_p <= 1, f"min_p={self.min_p} must be in [0, 1] (or null)")
        _check(
            self.repetition_penalty > 0,
            f"repetition_penalty={self.repetition_penalty} must be > 0 (1 = off, > 1 discourages repeats)",
        )


def sampling_config(sampling: SamplingConfig | None = None, **settings: Any) -> SamplingConfig:
    """`sampling` (None: the defaults) with keyword settings such as temperature=0.5 replaced, validated."""
    unknown = sorted(set(settings) - {f.name for f in fields(SamplingConfig)})
    if unknown:
        names = ", ".join(f.name for f in fields(SamplingConfig))
        raise TypeError(f"unknown sampling setting(s) {', '.join(unknown)}; the settings are {names}")
    sampling = sampling or SamplingConfig()
    return replace(sampling, **settings) if settings else sampling


# template=checkpoint (generate.py, callbacks.evaluate; data.template for evaluate.py): the prompt
# template saved with the checkpoint. null, its spelling before 0.5, means the same.
FROM_CHECKPOINT = "checkpoint"


@dataclass
class DecodingConfig(SamplingConfig):
    """The decoding settings generate.py and evaluation share (and SamplingConfig's). These defaults
    are evaluation's (evaluate.py, callbacks.evaluate, DecodeConfig in Python); generate.py's own are
    in conf/generate.yaml."""

    # Tokens generated per row at most (>= 1; generation also stops at end-of-text). None (evaluation
    # only): the longest reference's tokens plus a margin (a quarter of it, at least 8), at most
    # block_size.
    max_new_tokens: int | None = None
    # Rows generated together: generate, prompts x num_samples; evaluate, examples (by greedy and
    # sampled; beam search takes one example at a time).
    batch_size: int = 16
    # Beams kept by beam search: generate, > 1 searches (deterministic; the sampling knobs are
    # ignored); evaluate, the `beam` method's.
    num_beams: int = 4
    # Beam search ranks finished beams by log-probability / length ** length_penalty.
    length_penalty: float = 1.0
    # Seeds a torch.Generator for this command only (evaluate: the `sampled` method's, so that the
    # same settings sample the same outputs).
    seed: int = 1337


@dataclass
class CheckpointConfig:
    """Which checkpoint, in which dtype: the keys export.py, generate.py and evaluate.py share (as
    top-level keys: ckpt=..., dtype=...)."""

    # A checkpoint file, a run dir, a Hugging Face dir, or None for the newest run under runs_dir.
    ckpt: str | None = None
    # Where the newest run is looked for when ckpt is None.
    runs_dir: str = "runs"
    # float32, bfloat16 or float16: the weights' dtype (generate, evaluate: to compute in, the last two
    # for GPUs; export: as written).
    dtype: str = "float32"


@dataclass
class InferenceConfig(CheckpointConfig):
    """Which checkpoint, on which device, in which dtype: generate.py's and evaluate.py's keys."""

    # auto: cuda when available, else cpu; or a torch device such as cuda:1.
    device: str = "auto"


@dataclass
class GenerateConfig(DecodingConfig, InferenceConfig):
    """generate.py's keys: the decoding settings (temperature, top_k, num_beams, ...) are
    DecodingConfig's, the checkpoint's (ckpt, runs_dir, device, dtype) InferenceConfig's, as
    top-level keys."""

    # The text to continue; "-" reads it from stdin.
    prompt: str = "\n"
    # A file of prompts, one per line, or .jsonl with a "prompt" field per line; replaces `prompt`.
    prompt_file: str | None = None
    # How each prompt is written: checkpoint = as in the checkpoint's training pairs (as typed if it
    # has none); none = as typed; or a template (plain, alpaca, chatml) or format string such as
    # 'Q: {prompt}\nA: '.
    template: str | None = FROM_CHECKPOINT
    # Generation of a row ends where the first of these strings starts (or at end-of-text).
    stop: list[str] = field(default_factory=list)
    # Continuations per prompt, separated by a line of dashes.
    num_samples: int = 1
    # A REPL: each line typed is added to the conversation, and the model continues it.
    interactive: bool = False
    # KV cache; False recomputes the whole context every token (the reference path).
    use_cache: bool = True
    # torch.compile the decode step (for GPUs; compiling takes ~30 s on a CPU).
    compile: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        self.prompt_file = _home(self.prompt_file)  # ckpt, runs_dir: in gpt.runs.checkpoint.find_checkpoint
        self.template = FROM_CHECKPOINT if self.template is None else self.template
        # None is evaluation's (fitted to the references): generation has no references.
        _check(
            self.max_new_tokens is not None and self.max_new_tokens >= 1,
            f"max_new_tokens={self.max_new_tokens} must be >= 1",
        )
        _check(all(self.stop), "stop strings must not be empty; remove the empty one from stop=[...]")
        _check(self.num_beams >= 1, f"num_beams={self.num_beams} must be >= 1")
        _check(self.num_samples >= 1, f"num_samples={self.num_samples} must be >= 1")
        _check(self.batch_size >= 1, f"batch_size={self.batch_size} must be >= 1")
        _check(
            not (self.num_beams > 1 and self.num_samples > 1),
            f"beam search is deterministic: num_samples={self.num_samples} would repeat one result; "
            "use num_samples=1 with num_beams",
        )
        _check(
            not (self.interactive and (self.prompt == "-" or self.prompt_file)),
            "interactive=true reads what you type from stdin; drop prompt=- and prompt_file",
        )
        _one_of("dtype", self.dtype, ("float32", "bfloat16", "float16"))


# The command serve.py (conf/serve.yaml).


@dataclass
class ServeConfig(InferenceConfig):
    """serve.py's keys: the checkpoint (ckpt, runs_dir, device, dtype) and the server's."""

    # The address to listen on: 127.0.0.1 takes connections from this machine only; 0.0.0.0 from
    # anywhere (then set api_key).
    host: str = "127.0.0.1"
    port: int = 8000
    # Clients must send "Authorization: Bearer <api_key>" (None: the GPT_API_KEY environment
    # variable; no key at all: no check).
    api_key: str | None = None
    # The model's name in /v1/models and in requests (None: the checkpoint's run dir as found).
    model_name: str | None = None
    # How a chat's messages are written: checkpoint = as in the checkpoint's training pairs (a model
    # trained on text: each message's content on a line of its own); or a template (plain, alpaca,
    # chatml) or a format string.
    template: str = FROM_CHECKPOINT
    # Requests decoded together (continuous batching); more wait in a queue.
    max_batch: int = 8
    # Requests that may wait; one more is refused with 429 and Retry-After.
    max_queue: int = 64
    # A request body larger than this is refused with 413: by its Content-Length before it is read,
    # or, sent in chunks without one, as soon as it has sent more.
    max_body_bytes: int = 1_000_000

    def __post_init__(self) -> None:
        _check(0 < self.port < 65536, f"port={self.port} must be in 1..65535")
        _check(self.max_batch >= 1, f"max_batch={self.max_batch} must be >= 1")
        _check(self.max_queue >= 0, f"max_queue={self.max_queue} must be >= 0")
        _check(self.max_body_bytes >= 1024, f"max_body_bytes={self.max_body_bytes} must be >= 1024")
        _check(self.api_key != "", "api_key must not be empty; drop it to serve without a key")
        _one_of("dtype", self.dtype, ("float32", "bfloat16", "float16"))


# The commands export.py and compare.py (conf/export.yaml, conf/compare.yaml).

EXPORT_DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class ExportConfig(CheckpointConfig):
    """export.py's keys: the checkpoint (ckpt, runs_dir) and the exported weights' dtype are
    CheckpointConfig's."""

    # The folder to write the Hugging Face directory into (required).
    out: str | None = None
    # auto, gpt2, llama or qwen3; auto: whichever expresses the model (gpt.interop.hf checks the name).
    format: str = "auto"

    def __post_init__(self) -> None:
        # `ckpt=` and `out=` (empty) are null, as before the keys were Hydra's. ckpt and runs_dir get
        # their `~` expanded in gpt.runs.checkpoint.find_checkpoint.
        self.ckpt = self.ckpt or None
        self.out = _home(self.out) or None
        _check(
            self.out is not None, "say where to write the export: python export.py ckpt=RUN_OR_CKPT out=DIR"
        )
        _check(self.dtype in EXPORT_DTYPES, f"dtype={self.dtype} is not one of {', '.join(EXPORT_DTYPES)}")


@dataclass
class CompareConfig:
    # Run dirs, folders of runs (a sweep, a day of runs) and globs: a list (runs=[a,b]) or one string
    # (runs='runs/2026-11-21/*'); Any, because OmegaConf types no "list or string".
    runs: Any = field(default_factory=list)
    # Where the loss plot is written (.png, .pdf or .svg).
    out: str = "compare.png"

    def __post_init__(self) -> None:
        runs = [] if self.runs is None else [self.runs] if isinstance(self.runs, str) else self.runs
        _check(
            isinstance(runs, list) and all(isinstance(r, (str, int, float)) for r in runs),
            f"runs={self.runs!r}: give run dirs or globs as a list, runs=[DIR,...], or one glob string",
        )
        # A run named by a number (runs=[0,1] inside a sweep folder) is a folder name too; `runs=` is none.
        self.runs = [_home(str(r)) for r in runs if str(r)]
        _check(bool(self.runs), "say which runs to compare: python compare.py runs=[DIR,...]")
        self.out = _home(self.out)
        _check(bool(self.out), "out= is empty; name the plot file, such as out=compare.png")


# Evaluation: evaluate.py / python -m gpt.evaluate (conf/evaluate.yaml) and the training callback
# callbacks.evaluate (gpt.evaluate, docs/evaluation.md). Tasks: generate (prompt -> completion pairs
# completed and scored), hellaswag and mc (multiple choice, scored by log-likelihood as
# lm-evaluation-harness scores it), bpb (bits per byte on a corpus).
EVAL_TASKS = ("generate", "hellaswag", "mc", "bpb")
# task=bpb: which windows of the corpus's validation split are scored.
BPB_WINDOWS = ("val", "all")

EVAL_METHODS = ("greedy", "beam", "sampled")


def check_eval_task(task: str, limit: int | None, windows: str, prefix: str = "") -> None:
    """The keys evaluate.py and callbacks.evaluate share (`prefix` names where they are set)."""
    _one_of(f"{prefix}task", task, EVAL_TASKS)
    _check(limit is None or limit >= 1, f"{prefix}limit={limit} must be >= 1 (or null: all)")
    _one_of(f"{prefix}windows", windows, BPB_WINDOWS)


@dataclass
class DecodeConfig(DecodingConfig):
    """How an evaluation generates: which methods, and their settings (DecodingConfig's; the
    sampling settings, temperature, top_k, ..., apply to the `sampled` method only)."""

    # Decoding methods to compare, each scored on its own: greedy, beam (beam search), sampled.
    methods: list[str] = field(default_factory=lambda: ["greedy"])

    def __post_init__(self) -> None:
        super().__post_init__()
        methods = [self.methods] if isinstance(self.methods, str) else list(self.methods)
        unknown = [m for m in methods if m not in EVAL_METHODS]
        _check(
            not unknown,
            f"methods: {', '.join(map(repr, unknown))} is not a decoding method; choose among "
            f"{', '.join(EVAL_METHODS)}, e.g. methods=[greedy,beam]",
        )
        _check(bool(methods), f"methods=[] is empty; choose among {', '.join(EVAL_METHODS)}")
        self.methods = list(dict.fromkeys(methods))  # each once, in the order given
        _check(
            self.max_new_tokens is None or self.max_new_tokens >= 1,
            f"max_new_tokens={self.max_new_tokens} must be >= 1 (or null: fitted to the references)",
        )
        _check(self.batch_size >= 1, f"batch_size={self.batch_size} must be >= 1")
        _check(self.num_beams >= 1, f"num_beams={self.num_beams} must be >= 1")


@dataclass
class EvaluateConfig(DecodeConfig, InferenceConfig):
    """evaluate.py's keys: the decoding settings (methods, num_beams, temperature, ...) are
    DecodeConfig's, as top-level keys (task=generate only, but batch_size: every task); the
    checkpoint's (ckpt, runs_dir, device, dtype) InferenceConfig's."""

    # generate (complete prompt -> completion pairs; exact match, chrF, BLEU), hellaswag (its
    # validation set; acc, acc_norm), mc (a multiple-choice JSONL file) or bpb (bits per byte on a corpus).
    task: str = "generate"
    # The task's data. generate: the pairs (data.path, a .jsonl file or a folder; data.fields;
    # data.template `checkpoint`, the default, formats prompts as the checkpoint was trained). mc: the
    # JSONL file (data.path; data.fields renames context, choices, label). hellaswag: data.path, else
    # the validation set in the data root (downloaded once). bpb: a corpus (data=shakespeare,
    # data=text data.path=...); not given: the checkpoint's own training data. None: not given.
    data: DataConfig | None = None
    # Evaluate the first `limit` examples (bpb: windows) only; None: all.
    limit: int | None = None
    # bpb: val, the evenly spaced windows of the val split that validation scores (data.val_windows
    # of them: the run's own val/bpb); all, every token of the val split once, in back-to-back windows.
    windows: str = "val"
    # The folder the results are written to (<task>.json, and each example's outputs as JSONL);
    # None: <run dir>/evals/ beside the checkpoint.
    out: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.ckpt, self.out = self.ckpt or None, _home(self.out) or None
        check_eval_task(self.task, self.limit, self.windows)
        data = self.data
        if self.task == "generate":
            _check(
                data is not None,
                "task=generate completes prompt -> completion pairs: pass data.path=FILE.jsonl",
            )
        if self.task in ("generate", "mc", "hellaswag") and data is not None:
            _check(
                data.source == "pairs",
                f"data={data.source}: task={self.task} reads a .jsonl file; pass data.path=FILE.jsonl "
                "(data=NAME chooses a corpus for task=bpb)",
            )
        if self.task == "mc":
            _check(data is not None, "task=mc needs its questions: pass data.path=FILE.jsonl")
        if self.task == "mc" and data is not None:
            wrong = sorted(set(data.fields) - set(CHOICE_FIELDS))
            _check(
                not wrong,
                f"data.fields maps {', '.join(wrong)}; task=mc rows have {', '.join(CHOICE_FIELDS)}, "
                "e.g. 'data.fields={context: question, label: answer}'",
            )
        if self.task == "hellaswag" and data is not None:
            _check(
                not data.fields,
                "data.fields: task=hellaswag reads HellaSwag's own rows (ctx_a, ctx_b, endings, label); "
                "for another multiple-choice file use task=mc",
            )
        if self.task == "bpb" and data is not None:
            _check(
                data.source != "pairs",
                "task=bpb scores a text corpus: pass data=shakespeare, data=text data.path=FILE or "
                "data=hf data.path=NAME, or no data for the checkpoint's own",
            )
        _one_of("dtype", self.dtype, ("float32", "bfloat16", "float16"))
