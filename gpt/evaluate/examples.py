"""What an evaluation needs of each example: the prompt as token ids (formatted by the template the
model was trained with) and the reference completion, as text and as token ids. Built from rows of a
pairs file (gpt.data.pairs.Example), or from an example already encoded for training (its ids and
completion mask: the held-out val examples of a pairs run)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from gpt.data.pairs import Example
from gpt.errors import UserError
from gpt.tokenizer import Tokenizer


@dataclass(frozen=True)
class EvalExample:
    """prompt_ids: what generation continues; reference / reference_ids: the completion the model
    should generate, without the end-of-text token; where: FILE:LINE (or another label); prompt:
    the prompt's text, for the outputs file."""

    prompt_ids: list[int]
    reference: str
    reference_ids: list[int]
    where: str = ""
    prompt: str = ""


def _encode(tokenizer: Tokenizer, text: str, where: str, part: str) -> list[int]:
    try:
        return tokenizer.encode(text)
    except UserError as e:  # a character outside a character vocabulary
        what = str(e).split("; ")[0]
        raise UserError(
            f"{where}: the {part}: {what}; fix or drop the row, or evaluate a checkpoint whose "
            "tokenizer has that character"
        ) from None


def encode_examples(examples: Iterable[Example], tokenizer: Tokenizer) -> list[EvalExample]:
    """Rows of a pairs file (read with the model's template) -> EvalExamples; a prompt or a
    reference the tokenizer cannot encode is refused, naming the row."""
    out = []
    for ex in examples:
        prompt_ids = _encode(tokenizer, ex.prompt, ex.where, "prompt")
        if not prompt_ids:
            raise UserError(
                f"{ex.where}: its prompt is empty, and generation needs at least one token to continue; "
                "give it a prompt, or use a template that adds text (data.template=plain)"
            )
        reference_ids = _encode(tokenizer, ex.completion, ex.where, "completion")
        out.append(EvalExample(prompt_ids, ex.completion, reference_ids, ex.where, ex.prompt))
    return out


def example_from_tokens(
    ids: Sequence[int], completion: Sequence[bool], tokenizer: Tokenizer, where: str = ""
) -> EvalExample:
    """One example encoded for training (gpt.data.pairs.encode_example: ids, and for each whether it
    is trained on) -> an EvalExample: the prompt is everything before the last completion, the
    reference that completion without its end-of-text token."""
    ids, completion = [int(i) for i in ids], [bool(c) for c in completion]
    if len(ids) != len(completion) or not any(completion):
        raise ValueError(f"{where or 'an example'}: needs as many mask entries as ids, some of them True")
    end = len(completion) - completion[::-1].index(True)
    start = end
    while start > 0 and completion[start - 1]:
        start -= 1
    reference_ids = ids[start:end]
    if reference_ids and reference_ids[-1] == tokenizer.eot_token:
        reference_ids = reference_ids[:-1]
    prompt_ids = ids[:start]
    return EvalExample(
        prompt_ids, tokenizer.decode(reference_ids), reference_ids, where, tokenizer.decode(prompt_ids)
    )
