"""Text in, text out: prompts are encoded and left padded into one batch, and each row's tokens
become text as soon as that text is final (never inside a UTF-8 character, cut at end-of-text or
exactly where the first stop string starts).

    model, tokenizer = load_model("runs/...")          # once
    generate_text(model, tokenizer, "ROMEO:", 100, temperature=0.8, stop=["\\n\\n"])   # many times
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from gpt.errors import UserError
from gpt.generate.tokens import beam_search, generate
from gpt.model.transformer import GPT
from gpt.tokenizer import StreamDecoder, Tokenizer


def held_back(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of text that could still grow into a stop string."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:n]):
                longest = n
                break
    return longest


class TextStream:
    """One row's new tokens -> the text that is final so far.

    Text that might be the start of a stop string is held back until the next tokens tell, so a
    stream never shows text it later has to take back.
    """

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = ()) -> None:
        self.decoder = StreamDecoder(tokenizer)
        self.eot_token = tokenizer.eot_token
        self.stop = [s for s in stop if s]
        self.text = ""  # decoded so far; once a stop string is found, everything before it
        self.released = 0  # how much of text push/flush have returned
        self.done = False

    def push(self, token: int) -> str:
        if self.done:
            return ""
        if token == self.eot_token:
            return self.flush()
        return self._release(self.decoder.push([token]), final=False)

    def flush(self) -> str:
        """The rest of the text: generation is over for this row."""
        if self.done:
            return ""
        return self._release(self.decoder.flush(), final=True)

    def _release(self, piece: str, final: bool) -> str:
        start = self.released
        self.text += piece
        # A stop string cannot start before `released`: text that could begin one is never released.
        cuts = [i for s in self.stop if (i := self.text.find(s, start)) >= 0]
        if cuts:
            self.text, final = self.text[: min(cuts)], True
        end = len(self.text) if final else len(self.text) - held_back(self.text[start:], self.stop)
        self.released, self.done = end, final
        return self.text[start:end]


def encode_prompts(tokenizer: Tokenizer, prompts: Sequence[str]) -> list[list[int]]:
    ids = [tokenizer.encode(p) for p in prompts]
    for p, row in zip(prompts, ids, strict=True):
        if not row:
            raise UserError(f"the prompt {p!r} encodes to no tokens; give a non-empty prompt")
    return ids


def left_pad(ids: Sequence[list[int]], device: torch.device | str = "cpu") -> tuple[torch.Tensor, list[int]]:
    """Rows of different lengths -> (B, longest) with each row at the right end, and their lengths.

    The padding id is 0; the model never attends to padding, so its value does not matter.
    """
    width = max(len(row) for row in ids)
    idx = torch.tensor([[0] * (width - len(row)) + row for row in ids], dtype=torch.long, device=device)
    return idx, [len(row) for row in ids]


def generate_text(
    model: GPT,
    tokenizer: Tokenizer,
    prompt: str | Sequence[str],
    max_new_tokens: int = 200,
    *,
    stop: Sequence[str] = (),
    num_beams: int = 1,
    length_penalty: float = 1.0,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    compile: bool | str = False,
    on_text: Callable[[int, str], object] | None = None,
    **sampling,
) -> str | list[str]:
    """Continue a prompt (-> str) or a list of prompts, batched (-> list[str]); prompts not included.

    sampling: temperature, top_k, top_p, min_p, repetition_penalty (see gpt.generation.generate).
    num_beams > 1 runs beam search instead, prompt by prompt, and ignores sampling.
    seed: seeds a generator for this call (or pass your own `generator`).
    on_text(row, text) is called with each piece of text as it becomes final: streaming.
    """
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    ids = encode_prompts(tokenizer, prompts)
    device = next(model.parameters()).device
    if generator is None and seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    streams = [TextStream(tokenizer, stop) for _ in prompts]
    common = dict(use_cache=use_cache, vocab_size=tokenizer.vocab_size, compile=compile)

    def emit(row: int, piece: str) -> None:
        if piece and on_text is not None:
            on_text(row, piece)

    if num_beams > 1:
        for row, row_ids in enumerate(ids):
            idx = torch.tensor([row_ids], device=device)
            best = beam_search(
                model,
                idx,
                max_new_tokens,
                num_beams,
                length_penalty=length_penalty,
                eot_token=tokenizer.eot_token,
                **common,
            )
            for token in best:
                emit(row, streams[row].push(token))
            emit(row, streams[row].flush())
    else:
        idx, lengths = left_pad(ids, device)
        tokens = generate(
            model,
            idx,
            max_new_tokens,
            generator=generator,
            lengths=lengths,
            eot_token=tokenizer.eot_token,
            **common,
            **sampling,
        )
        for token in tokens:
            for row, t in enumerate(token.tolist()):
                emit(row, streams[row].push(t))
            if all(s.done for s in streams):
                break
        for row, s in enumerate(streams):
            emit(row, s.flush())
    texts = [s.text for s in streams]
    return texts[0] if isinstance(prompt, str) else texts
