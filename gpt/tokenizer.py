"""Tokenizers behind one small protocol, described by plain data saved with every checkpoint.

`CharTokenizer` maps each character of a corpus to an id; `TiktokenTokenizer` wraps any tiktoken
encoding by name; `BPETokenizer` is a byte-level BPE trained on a corpus (gpt.bpe trains it), run by
tiktoken from ranks it carries. `tokenizer_from_dict(tok.to_dict())` rebuilds exactly the same tokenizer.
"""

from __future__ import annotations

import base64
import codecs
from typing import Any, Protocol

import tiktoken
import tiktoken.load
import torch

from gpt.config import ENDOFTEXT
from gpt.errors import UserError

# tiktoken's "gpt2" encoding is r50k_base (same ranks, same split pattern) but is loaded from two
# other files; one name keeps offline caches and checkpoints simple.
TIKTOKEN_ALIASES = {"gpt2": "r50k_base"}
# The pre-tokenization patterns a trained BPE may use (data.bpe_pattern): text is cut into pieces at
# these, and no merge crosses two pieces. Each is read alike by the two regex engines that run it:
# tiktoken's (fancy-regex) to encode, Hugging Face tokenizers' (Oniguruma, Ruby syntax) to train and
# in exports.
SPLIT_PATTERNS = {
    # GPT-4's (cl100k_base): letters with one leading non-letter, digits in threes, newlines apart.
    # tiktoken writes `\p{N}{1,3}+`: Oniguruma reads a `+` after an interval as "one or more times"
    # (any run of digits), not as possessive; without it the two engines agree, and with nothing
    # after it in its branch it means the same to tiktoken.
    "gpt4": r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
    r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s""",
    # GPT-2's, as tiktoken writes it for r50k_base.
    "gpt2": r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s""",
}


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


def _read_local_file(blobpath: str) -> bytes:
    if blobpath.startswith(("http://", "https://")):
        raise FileNotFoundError(f"{blobpath} is not in tiktoken's cache")
    return _tiktoken_read_file(blobpath)


def get_encoding(name: str, download: bool = True) -> tiktoken.Encoding:
    """tiktoken.get_encoding: from the cache (TIKTOKEN_CACHE_DIR) or downloaded, with a timeout; with
    download=False, a vocabulary missing from the cache is a FileNotFoundError."""
    tiktoken.load.read_file = _read_file if download else _read_local_file
    try:
        return tiktoken.get_encoding(name)
    finally:
        tiktoken.load.read_file = _tiktoken_read_file


class Tokenizer(Protocol):
    """What the rest of the package uses of a tokenizer: CharTokenizer, TiktokenTokenizer, BPETokenizer."""

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


def ranks_to_text(ranks: dict[bytes, int]) -> str:
    """Ranks as the text of a .tiktoken file: a line `base64(token) rank` each, by rank."""
    by_rank = sorted(ranks.items(), key=lambda kv: kv[1])
    return "".join(f"{base64.b64encode(token).decode()} {rank}\n" for token, rank in by_rank)


def ranks_from_text(text: str) -> dict[bytes, int]:
    return {base64.b64decode(t): int(r) for t, r in (line.split() for line in text.splitlines() if line)}


class BPETokenizer(TiktokenTokenizer):
    """A byte-level BPE trained on a corpus (data.tokenizer=train; gpt.bpe.train_bpe), encoded by
    tiktoken from its ranks. A tiktoken encoding like the named ones, but its description holds the
    ranks themselves (as a .tiktoken file's text), its pattern's name and its special tokens: a
    checkpoint carries the whole tokenizer, with no file to find on another machine.

    Ids: the ranks (0-255 the single bytes, then the merges in the order they were learned), then
    the special tokens in order, end-of-text first.
    """

    def __init__(self, ranks: dict[bytes, int], pattern: str, special_tokens: list[str]) -> None:
        if pattern not in SPLIT_PATTERNS:
            raise UserError(f"unknown BPE pattern {pattern!r}; use one of {', '.join(SPLIT_PATTERNS)}")
        if not special_tokens or special_tokens[0] != ENDOFTEXT:
            raise ValueError(f"a trained BPE's first special token is {ENDOFTEXT}")
        self.ranks, self.pattern, self.special_tokens = ranks, pattern, list(special_tokens)
        self.name = f"bpe{len(ranks) + len(special_tokens)}"
        self.enc = tiktoken.Encoding(
            self.name,
            pat_str=SPLIT_PATTERNS[pattern],
            mergeable_ranks=ranks,
            special_tokens={s: len(ranks) + i for i, s in enumerate(special_tokens)},
        )
        self.vocab_size = self.enc.n_vocab
        self.eot_token = self.enc.eot_token

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": "bpe",
            "name": self.name,
            "pattern": self.pattern,
            "special_tokens": self.special_tokens,
            "ranks": ranks_to_text(self.ranks),
        }


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
    if kind == "bpe":
        return BPETokenizer(ranks_from_text(d["ranks"]), d["pattern"], d["special_tokens"])
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
