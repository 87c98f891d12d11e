"""Bits per byte of a checkpoint on a text corpus, without Lightning (evaluate task=bpb).

Bits per byte divides the cross-entropy of the text's tokens by the text's UTF-8 bytes, so models
with different tokenizers can be compared on the same text. End-of-text targets (document
separators) are no text: they count in neither (only in the loss). The corpus is prepared with the
checkpoint's tokenizer, as training prepares it, and its val split is scored in one of two ways:

- "val": the evenly spaced windows validation scores (`val_offsets`, data.val_windows of them), so
  that a run's own data gives back its last val/bpb;
- "all": every token of the val split once, in back-to-back windows.

With data.doc_mask (recorded by a checkpoint trained with it, or passed), each window's documents
attend only to themselves, as validation and training masked them.

The sums are computed as GPTLitModule.validation_step computes them, and returned as sums (nats,
tokens, text_nats, bytes, windows) so that ranks can add theirs up before `bpb_metrics` divides.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, overload

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from gpt.config import DataConfig
from gpt.data.prepare import prepare
from gpt.data.windows import FULL_VAL_WINDOWS, Windows, document_positions, document_separator, val_offsets
from gpt.errors import UserError
from gpt.model.transformer import GPT
from gpt.runs.checkpoint import checkpoint_data_config
from gpt.tokenizer import Tokenizer, token_byte_lengths

PASS_A_CORPUS = "data=shakespeare, data=text data.path=FILE or data=hf data.path=NAME"


def bpb_data(data: DataConfig | None, ckpt: dict[str, Any] | None, path: Path) -> DataConfig:
    """The corpus to score: `data` if given (val_windows null: the full validation set of
    training), else the data the checkpoint `ckpt` (None: a Hugging Face dir at `path`) trained on."""
    if data is not None:
        return data if data.val_windows is not None else replace(data, val_windows=FULL_VAL_WINDOWS)
    recorded = None if ckpt is None else checkpoint_data_config(ckpt)
    if recorded is None:
        raise UserError(
            f"{path} does not record its training data (a Hugging Face dir, or a checkpoint from "
            f"before 0.4.0); pass the corpus: {PASS_A_CORPUS}"
        )
    if recorded.source == "pairs":
        raise UserError(
            f"task=bpb scores a text corpus, and {path} was trained on prompt -> completion pairs (its "
            f"val/bpb is over completions); pass one: {PASS_A_CORPUS} (or use task=generate)"
        )
    return recorded


class BpbWindows(Sequence):
    """Windows of a val split as (start, stop) token spans: item i is (x, y), the tokens
    [start, stop - 1) and the same shifted by one, or, when the reader has a separator
    (data.doc_mask), (x, y, positions, segments) as Windows gives them. Slicing gives a BpbWindows
    over those spans, so ranks can take their share with [rank::world]."""

    def __init__(self, reader: Windows, spans: list[tuple[int, int]]) -> None:
        self.reader, self.spans = reader, spans

    @property
    def n_tokens(self) -> int:
        """Tokens of the whole val split."""
        return self.reader.n_tokens

    def __len__(self) -> int:
        return len(self.spans)

    @overload
    def __getitem__(self, i: int) -> tuple[torch.Tensor, ...]: ...
    @overload
    def __getitem__(self, i: slice) -> BpbWindows: ...
    def __getitem__(self, i: int | slice) -> tuple[torch.Tensor, ...] | BpbWindows:
        if isinstance(i, slice):
            return BpbWindows(self.reader, self.spans[i])
        start, stop = self.spans[i]
        chunk = torch.from_numpy(self.reader.read(start, stop).astype(np.int64))
        x, y = chunk[:-1], chunk[1:]
        if self.reader.separator is None:
            return x, y
        return x, y, *document_positions(x, self.reader.separator)


def all_spans(n_tokens: int, block_size: int) -> list[tuple[int, int]]:
    """Back-to-back windows from token 0: window k's inputs are tokens [k * block_size, (k + 1) *
    block_size) and its targets one further, the last window shorter, so that every token after
    the first is a target exactly once."""
    return [(s, min(s + block_size + 1, n_tokens)) for s in range(0, n_tokens - 1, block_size)]


def bpb_windows(
    data: DataConfig,
    tokenizer: Tokenizer,
    block_size: int,
    mode: str,
    limit: int | None = None,
    progress: bool = False,
) -> BpbWindows:
    """The windows of `data`'s val split to score, tokenized with `tokenizer` (the checkpoint's)
    and cached as training caches it. mode "val": the data.val_windows windows validation scores;
    "all": every token once (see the module docstring). `limit`: the first `limit` windows only.
    `progress`: prepare's progress bar and summary line, when the corpus is not in the cache."""
    prepared = prepare(data, tokenizer=tokenizer, verbose=progress)
    prepared.check_fits(block_size)
    separator = document_separator(tokenizer) if data.doc_mask else None
    reader = Windows(prepared.shard_paths("val"), prepared.meta["dtype"], block_size, separator)
    if mode == "val":
        offsets = val_offsets(reader.n_tokens, block_size, data.val_windows or FULL_VAL_WINDOWS)
        spans = [(o, o + block_size + 1) for o in offsets]
    elif mode == "all":
        spans = all_spans(reader.n_tokens, block_size)
    else:
        raise ValueError(f"mode {mode!r} is not 'val' or 'all'")
    return BpbWindows(reader, spans[:limit])


def batches(windows: Sequence, batch_size: int) -> Iterator[list[tuple[torch.Tensor, ...]]]:
    """Consecutive windows, at most batch_size of them, of one length (so they stack): a shorter
    window (the last of mode "all") gets a batch of its own."""
    batch: list[tuple[torch.Tensor, ...]] = []
    for window in windows:
        if batch and (len(batch) == batch_size or len(window[0]) != len(batch[0][0])):
            yield batch
            batch = []
        batch.append(window)
    if batch:
        yield batch


def score_bpb(
    model: GPT, tokenizer: Tokenizer, windows: Sequence, batch_size: int, progress: bool = False
) -> dict[str, float]:
    """Sums over `windows` ((x, y) pairs, or (x, y, positions, segments) with data.doc_mask) as
    validation computes them: "nats" (cross-entropy summed over the targets, in fp32), "tokens"
    (targets), "text_nats" (the nats of the targets that have bytes: not end-of-text), "bytes" (the
    targets' UTF-8 bytes), "windows"."""
    device = next(model.parameters()).device
    token_bytes = token_byte_lengths(tokenizer, model.config.vocab_size).to(device)
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # nats, tokens, text_nats, bytes
    bar = tqdm(total=len(windows), desc="bpb", unit="window", disable=None if progress else True, leave=False)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for batch in batches(windows, batch_size):
                # (B, T) each: x, y, and with data.doc_mask positions and segments
                x, y, *documents = (torch.stack(parts).to(device) for parts in zip(*batch, strict=True))
                positions, segments = documents or (None, None)
                logits = model(x, positions=positions, segments=segments)  # (B, T, V)
                nats = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="none")
                n_bytes = token_bytes[y.flatten()]  # (B * T,)
                sums[0] += nats.sum()
                sums[1] += y.numel()
                sums[2] += nats[n_bytes > 0].sum()
                sums[3] += n_bytes.sum()
                bar.update(len(batch))
    finally:
        bar.close()
        model.train(was_training)
    nats, tokens, text_nats, n_bytes = sums.tolist()
    return {
        "nats": nats,
        "tokens": tokens,
        "text_nats": text_nats,
        "bytes": n_bytes,
        "windows": float(len(windows)),
    }


def bpb_metrics(sums: dict[str, float]) -> dict[str, float]:
    """bits per byte (the text's nats over its bytes), mean loss (nats per token, every target) and
    perplexity, as on_validation_epoch_end computes val/bpb, val/loss and val/ppl."""
    loss = sums["nats"] / sums["tokens"]
    return {"bpb": sums["text_nats"] / (math.log(2) * sums["bytes"]), "loss": loss, "ppl": math.exp(loss)}
