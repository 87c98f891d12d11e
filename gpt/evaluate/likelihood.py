"""The log-likelihood of a continuation given a context, as lm-evaluation-harness computes it for a
causal model (its HFLM: lm_eval/api/model.py `_encode_pair` and `loglikelihood`,
lm_eval/models/huggingface.py `_loglikelihood_tokens`), so that a score here and the harness's score
of the same model on the same examples agree: the same token split between context and
continuation, the same left truncation to the model's block size, the same sum and greedy check."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm import tqdm

from gpt.errors import UserError
from gpt.model.transformer import GPT
from gpt.tokenizer import Tokenizer

Request = tuple[list[int], list[int]]


def encode_pair(tokenizer: Tokenizer, context: str, continuation: str) -> Request:
    """(context ids, continuation ids). The context's trailing whitespace moves to the start of the
    continuation, and the whole text is encoded at once, so the continuation's tokens are the ones the
    model would read in running text (BPE words carry their leading space); the continuation is what
    follows the context's own tokens.

    An empty context is the end-of-text token (the harness's prefix_token_id for a model without a
    BOS token, GPT-2's case). A context of whitespace only, which the harness cannot score (it
    leaves no context token), is treated alike, its whitespace kept in the continuation.
    """
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    if not context:
        if tokenizer.eot_token is None:
            raise UserError(
                "an example has an empty context, which is scored after the end-of-text token, and this "
                "tokenizer has none; give every example a context"
            )
        # The harness splits off the continuation's first token instead when it is the prefix
        # token; ours never is: no text encodes to the end-of-text token.
        return [tokenizer.eot_token], tokenizer.encode(continuation)
    whole = tokenizer.encode(context + continuation)
    context_ids = tokenizer.encode(context)
    return context_ids, whole[len(context_ids) :]


def check_requests(requests: Sequence[Request], block_size: int) -> None:
    for i, (context, continuation) in enumerate(requests):
        if not context or not continuation:
            part = "context" if not context else "continuation"
            raise UserError(
                f"request {i} has no {part} tokens (a continuation can merge into the context's last "
                "token); nothing to score"
            )
        if len(continuation) > block_size:
            raise UserError(
                f"request {i}: its continuation of {len(continuation)} tokens is longer than the model's "
                f"block_size {block_size}; shorten it"
            )


def model_input(request: Request, block_size: int) -> list[int]:
    """What the model reads: context and continuation without the last token (nothing predicts from
    it), the oldest tokens dropped when that exceeds block_size."""
    context, continuation = request
    return (context + continuation)[-(block_size + 1) :][:-1]


def score_batch(
    model: GPT, inputs: list[list[int]], continuations: list[list[int]]
) -> list[tuple[float, bool]]:
    """One forward over the right-padded inputs; each row's continuation log-likelihood and whether
    it is the argmax at every position."""
    device = next(model.parameters()).device
    idx = torch.zeros((len(inputs), max(map(len, inputs))), dtype=torch.long, device=device)
    for row, ids in enumerate(inputs):
        idx[row, : len(ids)] = torch.tensor(ids, device=device)
    logits = model(idx)  # (B, T, V); padding on the right changes nothing before it (causal)
    out = []
    for row, (ids, continuation) in enumerate(zip(inputs, continuations, strict=True)):
        # The positions whose next token is a continuation token: the last len(continuation) inputs.
        logprobs = logits[row, len(ids) - len(continuation) : len(ids)].float().log_softmax(-1)  # (C, V)
        target = torch.tensor(continuation, device=device)
        ll = logprobs.gather(-1, target[:, None]).sum().item()
        out.append((ll, bool((logprobs.argmax(-1) == target).all())))
    return out


def loglikelihoods(
    model: GPT, requests: Sequence[Request], batch_size: int, progress: bool = False
) -> list[tuple[float, bool]]:
    """For each (context ids, continuation ids): the sum of the continuation tokens' log-probabilities
    (float32) and whether greedy decoding would produce the continuation.

    Requests go longest first, as the harness orders them (its Collator), in right-padded batches
    of batch_size; the results come back in the order of `requests`. The model is in eval mode
    meanwhile, and back in the mode it was in afterwards.
    """
    block_size = model.config.block_size
    check_requests(requests, block_size)
    order = sorted(range(len(requests)), key=lambda i: (-len(requests[i][0] + requests[i][1]), i))
    results: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
    was_training = model.training
    model.eval()
    bar = tqdm(
        total=len(requests),
        desc="loglikelihood",
        unit="request",
        disable=None if progress else True,
        leave=False,
    )
    try:
        with torch.inference_mode(), bar:
            for start in range(0, len(order), batch_size):
                batch = order[start : start + batch_size]
                inputs = [model_input(requests[i], block_size) for i in batch]
                scores = score_batch(model, inputs, [requests[i][1] for i in batch])
                for i, score in zip(batch, scores, strict=True):
                    results[i] = score
                bar.update(len(batch))
    finally:
        model.train(was_training)
    return results
