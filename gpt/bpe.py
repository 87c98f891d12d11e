"""Training a byte-level BPE (data.tokenizer=train), and the same BPE in Hugging Face's format.

One encoding, two libraries. Hugging Face `tokenizers` (Rust, multi-threaded) learns the merges from
a stream of texts, holding only the counts of the pieces it has seen; tiktoken encodes with the ranks
they make (gpt.tokenizer.BPETokenizer): the 256 single bytes first, in byte order, then each merge's
product in the order the trainer learned it. tiktoken merges, again and again, the adjacent pair whose
product ranks lowest, which replays the trainer's merges: the tests check that the trained Hugging Face
tokenizer and tiktoken give the same ids. `hf_tokenizer` writes the ranks back as a Hugging Face
tokenizer (an export's tokenizer.json).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from gpt.tokenizer import SPLIT_PATTERNS, BPETokenizer

N_BYTES = 256


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in for each byte, which byte-level BPE files (vocab.json, merges.txt,
    tokenizer.json) write tokens in: printable Latin-1 bytes stand for themselves, the others
    (controls, space, ...) are shifted to 256 and up."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table, shifted = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


def bpe_merge_of(token: bytes, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    """The merge that creates `token`: byte-pair encode it with only the merges ranked before it;
    what is left is the two parts its own merge joins."""
    limit = ranks[token]
    parts = [bytes([b]) for b in token]
    while len(parts) > 2:
        best, best_rank = None, limit
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < best_rank:
                best, best_rank = i, rank
        if best is None:
            break
        parts[best : best + 2] = [parts[best] + parts[best + 1]]
    if len(parts) != 2:
        raise ValueError(f"token {token!r} is not the product of one BPE merge")
    return parts[0], parts[1]


def pre_tokenizer(pattern: str) -> pre_tokenizers.PreTokenizer:
    """Hugging Face's pre-tokenization for a pattern of SPLIT_PATTERNS: cut the text into its pieces,
    then write each piece's bytes in byte_to_unicode's characters."""
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_PATTERNS[pattern]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def train_hf(texts: Iterable[str], n_ranks: int, pattern: str) -> Tokenizer:
    """Hugging Face's BPE trainer on `texts` (any iterable: it is read once, in batches), learning
    up to n_ranks - 256 merges; fewer if the texts run out of pairs to merge."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizer(pattern)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=n_ranks,
        # Every byte is a token, seen in the corpus or not: any text can be encoded.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def ranks_from_hf(tokenizer: Tokenizer) -> dict[bytes, int]:
    """The ranks of a trained Hugging Face BPE: the bytes, then each merge's product in the order
    learned (a product already made by an earlier merge keeps its first rank)."""
    to_byte = {c: b for b, c in byte_to_unicode().items()}
    raw = json.loads(tokenizer.to_str())["model"]["merges"]
    # tokenizers < 0.20 writes each merge as "a b", later versions as ["a", "b"].
    merges = [m.split(" ") if isinstance(m, str) else m for m in raw]
    ranks = {bytes([b]): b for b in range(N_BYTES)}
    for a, b in merges:
        token = bytes(to_byte[c] for c in a + b)
        ranks.setdefault(token, len(ranks))
    return ranks


def train_bpe(
    texts: Iterable[str], vocab_size: int, pattern: str, special_tokens: Sequence[str]
) -> BPETokenizer:
    """A byte-level BPE of at most `vocab_size` tokens, special tokens included (end-of-text
    first), trained on `texts`. The same texts and settings give the same ranks."""
    ranks = ranks_from_hf(train_hf(texts, vocab_size - len(special_tokens), pattern))
    return BPETokenizer(ranks, pattern, list(special_tokens))


def hf_tokenizer(tokenizer: BPETokenizer) -> Tokenizer:
    """The same encoding as a Hugging Face tokenizer, built from the ranks alone: each token's
    merge recovered from the ranks (bpe_merge_of), the same ids, the same pattern, the special tokens
    after the ranks. As tiktoken does, a piece that is itself a token is that token (ignore_merges)."""
    show = byte_to_unicode()
    write = lambda b: "".join(show[x] for x in b)
    ranks = tokenizer.ranks
    vocab = {write(token): rank for token, rank in ranks.items()}
    merges = [
        (write(a), write(b))
        for a, b in (bpe_merge_of(token, ranks) for token in sorted(ranks, key=ranks.get) if len(token) > 1)
    ]
    hf = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True))
    hf.pre_tokenizer = pre_tokenizer(tokenizer.pattern)
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in tokenizer.special_tokens])
    return hf
