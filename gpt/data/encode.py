"""Documents -> token arrays: long documents cut at line breaks into parts, tokenized in ordered batches on
a pool of threads."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gpt.config import DataConfig
from gpt.data.sources import read_documents
from gpt.errors import UserError
from gpt.tokenizer import CharTokenizer, Tokenizer

# Characters separating documents for the character tokenizer (BPE uses its end-of-text token).
CHAR_SEPARATOR = "\n\n"
BATCH_CHARS = 1 << 20


def cut_point(text: str, start: int, limit: int) -> int:
    """Where the part from `start` ends: after its last blank line, else line break, in its second half."""
    lo, hi = start + limit // 2, start + limit
    for sep in ("\n\n", "\n"):
        i = text.rfind(sep, lo, hi)
        if i >= 0:
            return i + len(sep)
    return hi


def cut(pieces: Iterable[str], limit: int) -> Iterator[str]:
    """Re-cut a document's text into parts of at most `limit` characters, at line breaks when possible."""
    rest = ""
    for piece in pieces:
        text = rest + piece if rest else piece
        start = 0
        while len(text) - start > limit:
            end = cut_point(text, start, limit)
            yield text[start:end]
            start = end
        rest = text[start:]
    if rest:
        yield rest


@dataclass(frozen=True)
class Part:
    """The `index`-th part of document `doc`, and its text (kept by the splitter only while it may
    split the corpus by characters)."""

    doc: int
    index: int
    text: str = ""


def iter_parts(cfg: DataConfig, files: list[Path], progress: Callable[[int], None]) -> Iterator[Part]:
    doc = 0
    for pieces in read_documents(cfg, files, progress):
        n = 0
        for text in cut(pieces, cfg.doc_chars):
            yield Part(doc, n, text)
            n += 1
        doc += n > 0  # empty documents are skipped


# ----------------------------------------------------------------------------- tokenizing


class PartCounter:
    """Passes parts through, counting documents and noting whether any holds more than whitespace."""

    def __init__(self) -> None:
        self.documents, self.has_text = 0, False

    def __call__(self, parts: Iterable[Part]) -> Iterator[Part]:
        for part in parts:
            self.documents += part.index == 0
            self.has_text = self.has_text or not part.text.isspace()
            yield part


def empty_corpus(cfg: DataConfig, files: list[Path]) -> UserError:
    where = cfg.path if cfg.path else ", ".join(map(str, files))
    return UserError(f"the corpus ({where}) is empty; give it some text")


def token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 2**16 else "uint32"


def char_vocabulary(parts: Iterable[Part]) -> CharTokenizer:
    """The first pass of a character corpus: its set of characters (plus the separator's)."""
    chars: set[str] = set(CHAR_SEPARATOR)
    for part in parts:
        chars.update(part.text)
    return CharTokenizer("".join(sorted(chars)))


def check_characters(
    cfg: DataConfig, files: list[Path], tok: CharTokenizer, progress: Callable[[int], None]
) -> None:
    """The first pass of a corpus tokenized with a given character vocabulary (a checkpoint's: a model
    fine-tuned or evaluated) instead of its own: every character must be in it. File by file, so that the
    error names the file."""
    known = set(tok.chars)
    if not set(CHAR_SEPARATOR) <= known:
        raise UserError(
            f"the checkpoint's {len(tok.chars)}-character vocabulary (the model fine-tuned or evaluated) has "
            f"no {CHAR_SEPARATOR[0]!r}, which separates documents; use a character model that has it"
        )
    sources = [(str(p), [p]) for p in files] if files else [(f"the dataset {cfg.path}", [])]
    for where, group in sources:
        for pieces in read_documents(cfg, group, progress):
            for text in pieces:
                if not set(text) <= known:
                    c = next(c for c in text if c not in known)
                    raise UserError(
                        f"{where} holds {c!r} (U+{ord(c):04X}), a character not in the checkpoint's "
                        f"{len(tok.chars)}-character vocabulary (the model fine-tuned or evaluated); remove "
                        "or replace it in the corpus, or leave the file out with data.exclude"
                    )


def make_encoder(tok: Tokenizer, dtype: str) -> Callable[[list[str]], list[np.ndarray]]:
    if isinstance(tok, CharTokenizer):
        # A character's id from its rank among the vocabulary's code points, sorted (a vocabulary
        # built from a corpus is sorted; one given, a checkpoint's, need not be).
        code_points = np.array([ord(c) for c in tok.chars], dtype=np.uint32)
        order = np.argsort(code_points)
        sorted_points = code_points[order]

        def encode_chars(texts: list[str]) -> list[np.ndarray]:
            out = []
            for text in texts:
                cps = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
                ranks = np.searchsorted(sorted_points, cps)
                if ranks.size and (ranks.max() >= len(code_points) or (sorted_points[ranks] != cps).any()):
                    raise UserError("the corpus changed while it was being prepared; run the prepare again")
                out.append(order[ranks].astype(dtype))
            return out

        return encode_chars
    enc = tok.enc
    # encode_to_numpy with no special tokens allowed or disallowed is encode_ordinary (special-token
    # text is ordinary text), without building a Python list of ints; tiktoken releases the GIL.
    return lambda texts: [enc.encode_to_numpy(t, disallowed_special=()).astype(dtype) for t in texts]


def batches(parts: Iterable[Part], chars: int) -> Iterator[list[Part]]:
    batch: list[Part] = []
    size = 0
    for part in parts:
        batch.append(part)
        size += len(part.text)
        if size >= chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def encode_parts(
    parts: Iterable[Part], encode: Callable[[list[str]], list[np.ndarray]], workers: int
) -> Iterator[tuple[Part, np.ndarray]]:
    """Tokenize batches of parts on `workers` threads; results come back in corpus order, each
    part with its text.

    At most 2 x workers batches are in flight, so memory does not grow with the corpus.
    """
    with ThreadPoolExecutor(workers) as pool:
        pending: deque = deque()
        for batch in batches(parts, BATCH_CHARS):
            pending.append((batch, pool.submit(encode, [p.text for p in batch])))
            if len(pending) >= 2 * workers:
                done, future = pending.popleft()
                yield from zip(done, future.result(), strict=True)
        while pending:
            done, future = pending.popleft()
            yield from zip(done, future.result(), strict=True)
