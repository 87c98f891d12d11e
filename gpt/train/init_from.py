"""Where a fine-tuning run's starting weights, model config and tokenizer come from (init_from=).

init_from names a checkpoint of this trainer (a .ckpt file, or a run dir: its last.ckpt) or a
Hugging Face GPT-2 / Llama directory or hub name (read by gpt.interop.load). A run started from it
takes

- its model config, except what the command line says: model=NAME uses that preset instead, which
  must have the checkpoint's shape; model.FIELD=... without model= changes that field of the
  checkpoint's config (dropout, say, or a shorter block_size: learned positions keep their first
  rows);
- its tokenizer: data.tokenizer, when given on the command line, must name it (`train` for a BPE
  trained on its corpus, which tokenizes the new corpus as it is: it is not trained again), and a
  character model's vocabulary tokenizes the new corpus. `need_eot` asks for an end-of-text token: a
  character vocabulary without one gets it as one more id, and the model one more embedding row,
  the mean of the others (as Hugging Face's resize_token_embeddings);
- its weights, loaded before the first step. The optimizer, the LR schedule and the step count
  start fresh: this is not a resume (a run that resumes ignores init_from).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from gpt.config import ARCHITECTURE, TRAIN_TOKENIZER, ModelConfig
from gpt.errors import UserError, first_line
from gpt.interop.hf import is_hf_dir, model_config_from_hf
from gpt.interop.load import (
    HUB_MODELS,
    hf_tokenizer_description,
    read_hf_config,
    read_hf_state_dict,
    resolve_init_from,
)
from gpt.model.transformer import GPT
from gpt.runs.checkpoint import (
    check_vocabulary,
    checkpoint_model,
    clean_state_dict,
    describe_checkpoint,
    find_checkpoint,
    not_a_checkpoint,
    read_checkpoint,
)
from gpt.tokenizer import (
    TIKTOKEN_ALIASES,
    BPETokenizer,
    CharTokenizer,
    TiktokenTokenizer,
    Tokenizer,
    tokenizer_from_dict,
)

# What a user is told to do about an init_from that is not a checkpoint.
PASS_ANOTHER = "pass another init_from=PATH"


def overridden_keys(overrides: Iterable[str]) -> frozenset[str]:
    """The config keys a command line sets, from Hydra's override strings: "model" for model=small,
    "model.dropout" for model.dropout=0.1 (or +model.dropout=0.1)."""
    return frozenset(o.split("=", 1)[0].lstrip("+~") for o in overrides)


@dataclass(frozen=True)
class InitSource:
    """What init_from gives a new run: the model config and tokenizer to build it with, and the
    weights to start from (load_into)."""

    # init_from as given (for messages), and the .ckpt file or Hugging Face directory it names.
    source: str
    path: Path
    # The run's model config (vocab_size set) and tokenizer.
    model_config: ModelConfig
    tokenizer: Tokenizer
    # The checkpoint's own model config: the shapes of its weights.
    saved_config: ModelConfig

    @property
    def added_tokens(self) -> int:
        """Rows added to the embedding and the head: 1 for an end-of-text token, else 0."""
        return self.model_config.vocab_size - self.saved_config.vocab_size

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The checkpoint's weights, shaped for model_config: the first block_size learned
        positions, and the end-of-text row, if added, appended to the embeddings and the head."""
        if is_hf_dir(self.path):
            _, weights = read_hf_state_dict(self.path)
        else:
            weights = clean_state_dict(read_checkpoint(self.path, mmap=True, fix=PASS_ANOTHER)["state_dict"])
        for key in ("wpe.weight", "enc_wpe.weight"):  # an encoder-decoder's encoder has its own
            if key in weights:
                weights[key] = weights[key][: self.model_config.block_size]
        if self.added_tokens:
            # Both names of one tensor if tied; an untied encoder-decoder's encoder has its own too,
            # and value embeddings (model.value_embeds) a table of their own.
            for key in (
                "wte.weight",
                "lm_head.weight",
                *(k for k in ("enc_wte.weight", "wve.weight") if k in weights),
            ):
                w = weights[key]
                weights[key] = torch.cat([w, w.float().mean(0, keepdim=True).to(w.dtype)])
        return weights

    def load_into(self, model: GPT) -> None:
        try:
            model.load_state_dict(self.state_dict(), strict=True)
        except RuntimeError as e:  # missing, unexpected or mis-shaped weights
            raise UserError(
                f"init_from={self.source}: its weights do not match its model config "
                f"({first_line(e, limit=200)}); the file was edited or damaged, {PASS_ANOTHER}"
            ) from None

    def notes(self) -> list[str]:
        """What to log once the run has started."""
        lines = [f"initialized from {describe_checkpoint(self.path)}"]
        if self.added_tokens:
            lines.append(
                f"added an end-of-text token: vocab_size {self.saved_config.vocab_size} -> "
                f"{self.model_config.vocab_size}, its embedding row the mean of the others"
            )
        return lines


def resolve_init(
    source: str,
    model_cfg: ModelConfig,
    data_tokenizer: str,
    overridden: Collection[str],
    need_eot: bool = False,
) -> InitSource:
    """What a run started from `source` is built with; see the module docstring.

    `model_cfg` and `data_tokenizer` are the run's config as composed; `overridden`, the keys the
    command line set (overridden_keys), says which of it the user chose over the checkpoint's. The
    checkpoint is checked and described here; its weights are read by load_into.
    """
    path, saved, saved_tokenizer = read_source(source)
    given = data_tokenizer if "data.tokenizer" in overridden else None
    tokenizer = run_tokenizer(source, saved_tokenizer, given, need_eot)
    vocab = max(saved.vocab_size, tokenizer.vocab_size)  # one more for an end-of-text token added
    preset = "model" in overridden
    if preset:
        ours = model_cfg
    else:
        fields = {key.removeprefix("model.") for key in overridden if key.startswith("model.")}
        ours = replace(saved, **{"vocab_size": vocab} | {name: getattr(model_cfg, name) for name in fields})
    if ours.vocab_size is None:
        ours = replace(ours, vocab_size=vocab)
    check_shape(source, ours, replace(saved, vocab_size=vocab), preset)
    return InitSource(source, path, ours, tokenizer, saved)


def read_source(source: str) -> tuple[Path, ModelConfig, Tokenizer]:
    """The checkpoint init_from names, its model config and its tokenizer; the weights stay on disk."""
    path = Path(source).expanduser()
    if is_hf_dir(path) or (source in HUB_MODELS and not path.exists()):
        path = resolve_init_from(source)  # a hub name is downloaded
        config = model_config_from_hf(read_hf_config(path))
        tokenizer = tokenizer_from_dict(hf_tokenizer_description(path))
    elif path.exists():
        path = find_checkpoint(path)  # a run dir's last.ckpt
        ckpt = read_checkpoint(path, mmap=True, fix=PASS_ANOTHER)
        if not isinstance(ckpt.get("state_dict"), dict):
            raise not_a_checkpoint(path, "it has no state_dict", PASS_ANOTHER)
        config, tokenizer = checkpoint_model(ckpt, path, PASS_ANOTHER)
    else:
        raise UserError(
            f"init_from={source} does not exist; pass a run dir, a .ckpt file, a Hugging Face "
            f"checkpoint directory, or one of {', '.join(HUB_MODELS)}"
        )
    check_vocabulary(path, config, tokenizer)
    return path, config, tokenizer


def run_tokenizer(source: str, saved: Tokenizer, data_tokenizer: str | None, need_eot: bool) -> Tokenizer:
    """The checkpoint's tokenizer (with an end-of-text token if `need_eot`), which data.tokenizer,
    when given, must name."""
    if isinstance(saved, BPETokenizer):
        # data.tokenizer=train names it: the checkpoint's trained BPE, not one trained anew on this corpus.
        name, tokenizer = TRAIN_TOKENIZER, saved
    elif isinstance(saved, TiktokenTokenizer):
        name, tokenizer = saved.name, saved  # tiktoken encodings have an end-of-text token
    elif isinstance(saved, CharTokenizer):
        name, tokenizer = "char", saved.with_eot() if need_eot else saved
    else:
        raise TypeError(f"unknown tokenizer {saved!r}")
    if data_tokenizer is not None and TIKTOKEN_ALIASES.get(data_tokenizer, data_tokenizer) != name:
        what = f"a BPE trained on its corpus ({saved.name})" if name == TRAIN_TOKENIZER else name
        raise UserError(
            f"data.tokenizer={data_tokenizer} but init_from={source} was trained with {what}; "
            f"set data.tokenizer={name}"
        )
    return tokenizer


def check_shape(source: str, ours: ModelConfig, theirs: ModelConfig, preset: bool) -> None:
    """One line for a model config the checkpoint's weights do not fit. block_size may be smaller
    (the first learned positions are kept), or larger where positions are computed, not learned
    (rotary, sinusoidal); dropout and init_std only matter to training."""

    def fix(name: str) -> str:
        return (
            "leave out model= to use the checkpoint's config"
            if preset
            else f"leave out model.{name} to keep the checkpoint's"
        )

    # ffn_hidden is compared as resolved (ffn_hidden=None is a width too).
    shape = [name for name in ARCHITECTURE if name not in ("block_size", "ffn_hidden")]
    for name in [*shape, *(("rope_base",) if ours.pos_emb == "rope" else ())]:
        mine, want = getattr(ours, name), getattr(theirs, name)
        if mine != want:
            raise UserError(f"model.{name}={mine} but init_from={source} has {name}={want}; {fix(name)}")
    if ours.hidden_dim != theirs.hidden_dim:
        raise UserError(
            f"model.ffn_hidden={ours.hidden_dim} but init_from={source} has {theirs.hidden_dim}; "
            f"{fix('ffn_hidden')}"
        )
    if abs(ours.norm_eps - theirs.norm_eps) > 1e-12:
        raise UserError(
            f"model.norm_eps={ours.norm_eps} but init_from={source} has {theirs.norm_eps}; {fix('norm_eps')}"
        )
    if ours.block_size > theirs.block_size and ours.pos_emb == "learned":
        raise UserError(
            f"model.block_size={ours.block_size} exceeds init_from={source}'s {theirs.block_size} "
            f"learned positions; set model.block_size<={theirs.block_size}"
        )
