"""Training a byte-level BPE (gpt.bpe): Hugging Face's trainer and tiktoken's encoder agree on every id,
the ranks written back as a Hugging Face tokenizer agree too, and training is deterministic."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from collections import Counter

import pytest
import tiktoken
from tokenizers import Regex, pre_tokenizers

from gpt.bpe import (
    bpe_merge_of,
    byte_to_unicode,
    hf_tokenizer,
    pre_tokenizer,
    ranks_from_hf,
    train_bpe,
    train_hf,
)
from gpt.tokenizer import ENDOFTEXT, SPLIT_PATTERNS, BPETokenizer
from tests.helpers import ROOT, SHAKESPEARE

# What the patterns and the two regex engines could disagree on: Unicode spaces and line breaks,
# runs of digits and spaces, contractions in both cases, CRLF, emoji, scripts without spaces.
EDGES = (
    "x = 1234567 + 12\r\n\tif a:  \n\n    return 'll'S 'LL\u00a0nbsp\u3000ideographic\u2028line\u2029para"
    " naïve café 😀👍🏽 日本語のテキスト Ελληνικά\x0b\x0c 3.14159e-10  \n \n  trailing   "
)


def shakespeare_parts(text: str, size: int = 32_768) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)]


def hf_ids_as_ours(hf, text: str, ranks: dict[bytes, int]) -> list[int]:
    """The trained Hugging Face tokenizer's encoding of `text`, each token as its rank (its own ids
    are not ours: they follow its alphabet's order)."""
    to_byte = {c: b for b, c in byte_to_unicode().items()}
    return [ranks[bytes(to_byte[c] for c in token)] for token in hf.encode(text).tokens]


@pytest.mark.parametrize("pattern", list(SPLIT_PATTERNS))
def test_tiktoken_encodes_as_the_trained_tokenizer_and_round_trips(shakespeare_text, pattern):
    hf = train_hf(shakespeare_parts(shakespeare_text), 1024, pattern)
    ranks = ranks_from_hf(hf)
    tok = BPETokenizer(ranks, pattern, [ENDOFTEXT])
    assert len(ranks) == 1024 and tok.vocab_size == 1025 and tok.eot_token == 1024
    for text in (shakespeare_text, EDGES, EDGES.upper()):
        ids = tok.encode(text)
        assert ids == hf_ids_as_ours(hf, text, ranks)
        assert tok.decode(ids) == text
    assert len(tok.encode(shakespeare_text)) < len(shakespeare_text) / 2.2  # it learned something


@pytest.mark.parametrize("pattern", list(SPLIT_PATTERNS))
def test_hugging_face_tokenizer_from_the_ranks_encodes_as_tiktoken(shakespeare_text, pattern):
    tok = train_bpe(shakespeare_parts(shakespeare_text), 700, pattern, [ENDOFTEXT, "<|user|>"])
    hf = hf_tokenizer(tok)
    for text in (shakespeare_text, EDGES):
        ids = tok.encode(text)
        assert hf.encode(text).ids == ids
        assert hf.decode(ids) == text
    assert hf.token_to_id(ENDOFTEXT) == tok.eot_token == 698 and hf.token_to_id("<|user|>") == 699


def test_vocab_size_counts_the_bytes_the_merges_and_the_special_tokens(shakespeare_text):
    tok = train_bpe([shakespeare_text[:20_000]], 300, "gpt2", [ENDOFTEXT, "<|a|>", "<|b|>"])
    assert tok.vocab_size == 300 and len(tok.ranks) == 297
    assert sorted(tok.ranks.values()) == list(range(297))
    assert all(tok.ranks[bytes([b])] == b for b in range(256))  # the bytes first, in byte order
    assert tok.enc._special_tokens == {ENDOFTEXT: 297, "<|a|>": 298, "<|b|>": 299}
    assert tok.encode("<|a|> <|endoftext|>") == tok.encode("<|a|>") + tok.encode(" <|endoftext|>")
    assert max(tok.encode("<|a|> <|endoftext|>")) < 297  # special-token text is ordinary text
    # Bytes never seen in training are tokens all the same.
    assert tok.decode(tok.encode("ÿ\x00€")) == "ÿ\x00€"


def test_a_corpus_out_of_pairs_gives_a_smaller_vocabulary():
    tok = train_bpe(["abab abab"] * 3, 1000, "gpt4", [ENDOFTEXT])
    # "ab" x 2 with and without a leading space: ab, abab, " ", " ab"... only a few merges exist.
    assert 256 < len(tok.ranks) < 262 and tok.vocab_size == len(tok.ranks) + 1
    assert tok.encode("abab abab") == [tok.ranks[b"abab"], tok.ranks[b" abab"]]


def test_the_first_merge_is_the_most_frequent_pair(shakespeare_text):
    """Rank 256 is the first merge learned: the pair of bytes most frequent within the pieces the
    pattern cuts the text into (counted here in Python)."""
    parts = shakespeare_parts(shakespeare_text)
    tok = train_bpe(parts, 300, "gpt2", [ENDOFTEXT])
    split = pre_tokenizer("gpt2")
    pairs: Counter[bytes] = Counter()
    to_byte = {c: b for b, c in byte_to_unicode().items()}
    for part in parts:
        for piece, _ in split.pre_tokenize_str(part):
            raw = bytes(to_byte[c] for c in piece)
            pairs.update(raw[i : i + 2] for i in range(len(raw) - 1))
    (top, count), (_, second) = pairs.most_common(2)
    assert count > second  # no tie to break
    first = next(t for t, r in tok.ranks.items() if r == 256)
    assert first == top and bpe_merge_of(first, tok.ranks) == (top[:1], top[1:])


def ranks_digest(tok: BPETokenizer) -> str:
    return hashlib.sha256(tok.to_dict()["ranks"].encode()).hexdigest()


def test_training_is_deterministic_within_and_across_processes(shakespeare_text):
    """The trainer's hash maps are seeded at random in each process (Rust's), and it counts on
    several threads: the ranks must not depend on either."""
    parts = shakespeare_parts(shakespeare_text[:300_000])
    digests = {ranks_digest(train_bpe(parts, 2000, "gpt4", [ENDOFTEXT])) for _ in range(2)}
    code = (
        "import sys; from tests.test_bpe import ranks_digest, shakespeare_parts; from gpt.bpe import "
        "train_bpe; text = open(sys.argv[1], encoding='utf-8').read()[:300_000]; "
        "print(ranks_digest(train_bpe(shakespeare_parts(text), 2000, 'gpt4', ['<|endoftext|>'])))"
    )
    other = subprocess.run(
        [sys.executable, "-c", code, str(SHAKESPEARE)], cwd=ROOT, capture_output=True, text=True, check=True
    )
    digests.add(other.stdout.strip())
    assert len(digests) == 1


def test_gpt2_pattern_is_r50k_base_s():
    assert SPLIT_PATTERNS["gpt2"] == tiktoken.get_encoding("r50k_base")._pat_str


def test_gpt4_pattern_leaves_out_a_possessive_interval_oniguruma_reads_otherwise():
    """cl100k_base's `\\p{N}{1,3}+`: digits in threes to tiktoken, any run of digits to Oniguruma, which
    reads the `+` as a repeat of the interval; our gpt4 pattern has `\\p{N}{1,3}` and both agree."""
    cl100k = SPLIT_PATTERNS["gpt4"].replace(r"\p{N}{1,3}", r"\p{N}{1,3}+")

    def hf_pieces(pattern: str) -> list[str]:
        split = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
        return [piece for piece, _ in split.pre_tokenize_str("x 1234567")]

    assert hf_pieces(cl100k) == ["x", " ", "1234567"]
    assert hf_pieces(SPLIT_PATTERNS["gpt4"]) == ["x", " ", "123", "456", "7"]
