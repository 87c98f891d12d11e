"""Each decoding method over a list of examples, with the generation functions of gpt.generate
(batched, left padded rows for greedy and sampled; beam search one example at a time), stopping at
the tokenizer's end-of-text token; then the scores of gpt.evaluate.metrics."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import fields
from typing import Any

import torch
from tqdm import tqdm

from gpt.config import DecodeConfig, SamplingConfig
from gpt.evaluate.examples import EvalExample
from gpt.evaluate.metrics import matches, score
from gpt.generate.text import left_pad
from gpt.generate.tokens import beam_search, generate
from gpt.model.transformer import GPT
from gpt.tokenizer import Tokenizer

# Greedy decoding: the argmax at each step (the other sampling settings do not apply).
GREEDY = SamplingConfig(temperature=0.0, top_k=None)


def default_max_new_tokens(examples: Sequence[EvalExample], block_size: int) -> int:
    """Enough for the longest reference and its end-of-text token, with a margin (a quarter of it,
    at least 8), at most block_size."""
    longest = max((len(e.reference_ids) for e in examples), default=0)
    return max(1, min(block_size, longest + max(8, longest // 4)))


def until_eot(ids: list[int], eot_token: int | None) -> list[int]:
    return ids[: ids.index(eot_token)] if eot_token in ids else ids


def sampling_of(settings: DecodeConfig) -> SamplingConfig:
    """The `sampled` method's settings: the SamplingConfig fields of `settings`."""
    return SamplingConfig(**{f.name: getattr(settings, f.name) for f in fields(SamplingConfig)})


def generate_ids(
    model: GPT,
    tokenizer: Tokenizer,
    examples: Sequence[EvalExample],
    method: str,
    settings: DecodeConfig,
    max_new_tokens: int,
    progress: bool = False,
) -> list[list[int]]:
    """Each example's generated tokens, end-of-text and what follows it cut off."""
    device = next(model.parameters()).device
    eot, vocab = tokenizer.eot_token, tokenizer.vocab_size
    out: list[list[int]] = []
    with tqdm(
        total=len(examples), desc=method, unit="example", disable=None if progress else True, leave=False
    ) as bar:
        if method == "beam":
            for ex in examples:
                idx = torch.tensor([ex.prompt_ids], dtype=torch.long, device=device)
                best = beam_search(
                    model,
                    idx,
                    max_new_tokens,
                    settings.num_beams,
                    length_penalty=settings.length_penalty,
                    eot_token=eot,
                    vocab_size=vocab,
                )
                out.append(until_eot(best, eot))
                bar.update(1)
            return out
        sampling = sampling_of(settings) if method == "sampled" else GREEDY
        generator = torch.Generator(device=device).manual_seed(settings.seed) if method == "sampled" else None
        for start in range(0, len(examples), settings.batch_size):
            batch = examples[start : start + settings.batch_size]
            idx, lengths = left_pad([ex.prompt_ids for ex in batch], device)
            steps = list(
                generate(
                    model,
                    idx,
                    max_new_tokens,
                    sampling=sampling,
                    generator=generator,
                    lengths=lengths,
                    eot_token=eot,
                    vocab_size=vocab,
                )
            )
            rows = torch.stack(steps, dim=1).tolist()  # (B, steps)
            out += [until_eot(row, eot) for row in rows]
            bar.update(len(batch))
    return out


def evaluate(
    model: GPT,
    tokenizer: Tokenizer,
    examples: Sequence[EvalExample],
    settings: DecodeConfig,
    progress: bool = False,
) -> tuple[dict[str, dict[str, float]], list[dict[str, Any]]]:
    """Generate a completion of every example with each of settings.methods and score them.

    Returns the metrics, {method: {metric: percentage}}, and one record per example: where, prompt,
    reference, and for each method its output (`greedy`) and whether it matched (`greedy_match`).
    The model is in eval mode meanwhile, and back in the mode it was in afterwards.
    """
    n = settings.max_new_tokens or default_max_new_tokens(examples, model.config.block_size)
    references = [ex.reference for ex in examples]
    records: list[dict[str, Any]] = [
        {"where": ex.where, "prompt": ex.prompt, "reference": ex.reference} for ex in examples
    ]
    metrics: dict[str, dict[str, float]] = {}
    was_training = model.training
    model.eval()
    try:
        for method in settings.methods:
            ids = generate_ids(model, tokenizer, examples, method, settings, n, progress)
            outputs = [tokenizer.decode(row) for row in ids]
            metrics[method] = score(outputs, references, ids, [ex.reference_ids for ex in examples])
            for record, output, reference in zip(records, outputs, references, strict=True):
                record[method] = output
                record[f"{method}_match"] = matches(output, reference)
    finally:
        model.train(was_training)
    return metrics, records
