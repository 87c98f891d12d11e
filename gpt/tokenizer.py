"""Tokenizers behind one small protocol, described by plain data saved with every checkpoint.

`CharTokenizer` maps each character of a corpus to an id; `TiktokenTokenizer` wraps any tiktoken
encoding by name. `tokenizer_from_dict(tok.to_dict())` rebuilds exactly the same tokenizer.
"""

from __future__ import annotations

import codecs
from typing import Any, Protocol

import tiktoken
import tiktoken.load
import torch

from gpt.errors import UserError

# tiktoken's "gpt2" encoding is r50k_base (same ranks, same split pattern) but is loaded from two
# other files; one name keeps offline caches and checkpoints simple.
TIKTOKEN_ALIASES = {"gpt2": "r50k_base"}


# Seconds a vocabulary download may wait to connect or for its next bytes. tiktoken downloads a
# vocabulary missing from its cache with requests.get and no timeout, which on a network that drops
# packets waits forever; get_encoding swaps in a download with a timeout (tiktoken.load.read_file,
# which tiktoken >= 0.7 has).
DOWNLOAD_TIMEOUT = 20.0
_tiktoken_read_file = tiktoken.load.read_file


def _read_file(blobpath: str) -> bytes:
    if not blobpath.startswith(("http://", "https://")):
        return _tiktoken_read_file(blobpath)
    import requests  # as in tiktoken: needed only when a vocabulary is downloaded

    resp = requests.get(blobpath, timeout=DOWNLOAD_TIMEOUT)
    resp.raise_for_status()
    return resp.content


def get_encoding(name: str) -> tiktoken.Encoding:
    """tiktoken.get_encoding: from the cache (TIKTOKEN_CACHE_DIR) or downloaded, with a timeout."""
    tiktoken.load.read_file = _read_file
    try:
        return tiktoken.get_encoding(name)
    finally:
        tiktoken.load.read_file = _tiktoken_read_file


class Tokenizer(Protocol):
    """What the rest of the package uses of a tokenizer; CharTokenizer and TiktokenTokenizer are the two."""

    vocab_size: int
    eot_token: int | None

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: list[int]) -> str: ...
    def decode_bytes(self, ids: list[int]) -> bytes: ...
    def to_dict(self) -> dict[str, Any]: ...


class CharTokenizer:
    """One id per character, in sorted order of the characters of the corpus.

    With `eot`, one more id, len(chars), is an end-of-text token that no text encodes to and that
    decodes to nothing: paired data ends each completion with it, so generation knows where to stop.
    """

    def __init__(self, chars: str, eot: bool = False) -> None:
        if len(set(chars)) != len(chars):
            raise ValueError("CharTokenizer vocabulary has repeated characters")
        self.chars = chars
        self.stoi = {c: i for i, c in enumerate(chars)}
        self.eot_token: int | None = len(chars) if eot else None
        self.vocab_size = len(chars) + eot

    @classmethod
    def from_text(cls, text: str, eot: bool = False) -> CharTokenizer:
        return cls("".join(sorted(set(text))), eot)

    def with_eot(self) -> CharTokenizer:
        """The same characters, with an end-of-text token (itself if it has one)."""
        return self if self.eot_token is not None else CharTokenizer(self.chars, eot=True)

    def encode(self, text: str) -> list[int]:
        try:
            return [self.stoi[c] for c in text]
        except KeyError as e:
            c = e.args[0]
            raise UserError(
                f"character {c!r} (U+{ord(c):04X}) is not in this model's {len(self.chars)}-character "
                "vocabulary; remove it from the prompt"
            ) from None

    def decode(self, ids: list[int]) -> str:
        return "".join(self.chars[i] for i in ids if i != self.eot_token)

    def decode_bytes(self, ids: list[int]) -> bytes:
        return self.decode(ids).encode("utf-8")

    def to_dict(self) -> dict[str, Any]:
        # "eot" only when set, so the description of a tokenizer without one is what it always was.
        return {"kind": "char", "chars": self.chars} | ({"eot": True} if self.eot_token is not None else {})


class TiktokenTokenizer:
    """A tiktoken BPE encoding by name (r50k_base / gpt2, p50k_base, cl100k_base, o200k_base, ...)."""

    def __init__(self, name: str) -> None:
        self.name = TIKTOKEN_ALIASES.get(name, name)
        if self.name not in tiktoken.list_encoding_names():
            raise UserError(
                f"unknown tokenizer {name!r}; use 'char' or a tiktoken encoding: "
                + ", ".join(sorted(tiktoken.list_encoding_names()))
            )
        try:
            self.enc = get_encoding(self.name)
        except Exception as e:  # network or cache failures surface as many exception types
            raise UserError(
                f"could not load tiktoken encoding {self.name!r} ({type(e).__name__}); offline, set "
                "TIKTOKEN_CACHE_DIR to a folder that holds its cached file"
            ) from e
        self.vocab_size = self.enc.n_vocab
        self.eot_token = self.enc.eot_token

    def encode(self, text: str) -> list[int]:
        # Special-token text such as "<|endoftext|>" in a corpus is ordinary text, not a control token.
        return self.enc.encode_ordinary(text)

    def decode(self, ids: list[int]) -> str:
        return self.enc.decode(ids)

    def decode_bytes(self, ids: list[int]) -> bytes:
        return self.enc.decode_bytes(ids)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "tiktoken", "name": self.name}


def get_tokenizer(name: str, text: str | None = None) -> Tokenizer:
    """'char' (built from `text`) or a tiktoken encoding name."""
    if name == "char":
        if text is None:
            raise ValueError("a character tokenizer is built from its corpus: pass text")
        return CharTokenizer.from_text(text)
    return TiktokenTokenizer(name)


def tokenizer_from_dict(d: dict[str, Any]) -> Tokenizer:
    kind = d.get("kind")
    if kind == "char":
        return CharTokenizer(d["chars"], eot=bool(d.get("eot", False)))
    if kind == "tiktoken":
        return TiktokenTokenizer(d["name"])
    raise UserError(f"unknown tokenizer description {d!r}; the checkpoint or meta.json is not ours")


def token_byte_lengths(tokenizer: Tokenizer, vocab_size: int) -> torch.Tensor:
    """UTF-8 bytes of the text of each token id, to turn nats per token into bits per byte: 0 for
    end-of-text (a document separator, the end of a completion: no text, though a BPE decodes it to
    the 13 bytes of its name) and for padding ids."""
    lengths = [
        0 if i == tokenizer.eot_token else len(tokenizer.decode_bytes([i]))
        for i in range(tokenizer.vocab_size)
    ]
    return torch.tensor(lengths + [0] * (vocab_size - tokenizer.vocab_size), dtype=torch.float32)


class StreamDecoder:
    """Turns token ids into text as they arrive without splitting a UTF-8 character.

    BPE tokens are byte sequences and one character may span two tokens; bytes are held back
    until they complete a character.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, ids: list[int]) -> str:
        return self._utf8.decode(self.tokenizer.decode_bytes(ids))

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)
