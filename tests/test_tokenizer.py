import socket
import time

import pytest
import tiktoken
import tiktoken.load
import tiktoken.registry
import torch

import gpt.tokenizer
from gpt.errors import UserError
from gpt.tokenizer import (
    BPETokenizer,
    CharTokenizer,
    StreamDecoder,
    TiktokenTokenizer,
    get_tokenizer,
    token_byte_lengths,
    tokenizer_from_dict,
)


def test_char_round_trip_and_sorted_vocab():
    tok = CharTokenizer.from_text("hello world\n")
    assert tok.chars == "\n dehlorw"
    assert tok.encode("hello") == [4, 3, 5, 5, 6]
    assert tok.decode(tok.encode("world hello\n")) == "world hello\n"


def test_char_unknown_character_names_it():
    tok = CharTokenizer.from_text("abc")
    with pytest.raises(UserError, match=r"character 'é' \(U\+00E9\) is not in this model's 3-character"):
        tok.encode("abé")


def test_char_description_round_trip(shakespeare_text):
    tok = get_tokenizer("char", shakespeare_text)
    assert tok.vocab_size == 65
    again = tokenizer_from_dict(tok.to_dict())
    assert again.chars == tok.chars
    assert again.encode(shakespeare_text[:1000]) == tok.encode(shakespeare_text[:1000])


def test_tiktoken_round_trip_known_ids():
    tok = TiktokenTokenizer("r50k_base")
    assert tok.vocab_size == 50257 and tok.eot_token == 50256
    assert tok.encode("Hello world") == [15496, 995]  # GPT-2's ids
    text = "ROMEO: But soft, what light — naïve café 🙂"
    assert tok.decode(tok.encode(text)) == text


def test_gpt2_alias_is_r50k_base():
    tok = get_tokenizer("gpt2")
    assert tok.to_dict() == {"kind": "tiktoken", "name": "r50k_base"}
    assert tokenizer_from_dict(tok.to_dict()).encode("Hello world") == [15496, 995]


def test_special_token_text_is_ordinary_text():
    tok = TiktokenTokenizer("r50k_base")
    assert 50256 not in tok.encode("a <|endoftext|> b")


def test_unknown_tokenizer_name_lists_choices():
    with pytest.raises(UserError, match="unknown tokenizer 'nope'.*r50k_base"):
        get_tokenizer("nope")


def test_bad_description_is_a_user_error():
    with pytest.raises(UserError, match="unknown tokenizer description"):
        tokenizer_from_dict({"kind": "sentencepiece"})


def test_stream_decoder_never_splits_a_character():
    tok = TiktokenTokenizer("r50k_base")
    text = "café 🙂 über — ok"
    ids = tok.encode(text)
    # Some emoji bytes span several tokens: decoding one token alone gives invalid UTF-8.
    assert any("\ufffd" in tok.decode([i]) for i in ids)
    decoder = StreamDecoder(tok)
    pieces = [decoder.push([i]) for i in ids] + [decoder.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_download_on_a_network_that_never_answers_fails_after_the_timeout(tmp_path, monkeypatch):
    """tiktoken downloads a missing vocabulary with no timeout of its own; a proxy that accepts the
    connection and never answers stands in for a network that drops packets."""
    monkeypatch.delitem(tiktoken.registry.ENCODINGS, "cl100k_base", raising=False)  # not loaded before
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))  # not cached either
    monkeypatch.setattr(gpt.tokenizer, "DOWNLOAD_TIMEOUT", 0.5)
    with socket.socket() as proxy:
        proxy.bind(("127.0.0.1", 0))
        proxy.listen()
        for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
            monkeypatch.setenv(name, f"http://127.0.0.1:{proxy.getsockname()[1]}")
        for name in ("NO_PROXY", "no_proxy"):
            monkeypatch.delenv(name, raising=False)
        start = time.monotonic()
        with pytest.raises(
            UserError, match="could not load tiktoken encoding 'cl100k_base' .*TIKTOKEN_CACHE_DIR"
        ):
            TiktokenTokenizer("cl100k_base")
        assert time.monotonic() - start < 10
    assert tiktoken.load.read_file is gpt.tokenizer._tiktoken_read_file  # tiktoken's own again


def test_char_tokenizer_end_of_text_is_one_more_id_that_decodes_to_nothing():
    tok = CharTokenizer.from_text("ba", eot=True)
    assert (tok.vocab_size, tok.eot_token) == (3, 2)
    assert tok.decode([0, 2, 1]) == "ab" and tok.decode_bytes([2]) == b""
    assert tokenizer_from_dict(tok.to_dict()).eot_token == 2
    # Without one, the description is what it always was, so old checkpoints compare equal.
    assert CharTokenizer("ab").to_dict() == {"kind": "char", "chars": "ab"}
    assert CharTokenizer("ab").with_eot().to_dict() == tok.to_dict()


def test_token_byte_lengths_are_utf8_bytes_with_zeros_for_end_of_text_and_padding():
    lengths = token_byte_lengths(CharTokenizer("\naé€😀"), vocab_size=7)
    assert lengths.tolist() == [1.0, 1.0, 2.0, 3.0, 4.0, 0.0, 0.0]  # "\n" (separators) is text
    lengths = token_byte_lengths(CharTokenizer("\naé€😀", eot=True), vocab_size=7)
    assert lengths.tolist() == [1.0, 1.0, 2.0, 3.0, 4.0, 0.0, 0.0]  # end-of-text is id 5
    enc = tiktoken.get_encoding("r50k_base")
    lengths = token_byte_lengths(TiktokenTokenizer("r50k_base"), vocab_size=50_304)
    assert enc.eot_token == enc.n_vocab - 1 == 50_256
    expected = [len(enc.decode_single_token_bytes(i)) for i in range(enc.eot_token)]
    assert lengths.tolist() == expected + [0] + [0] * (50_304 - enc.n_vocab)  # not <|endoftext|>'s 13


def small_bpe(shakespeare_text: str, specials: tuple[str, ...] = ()) -> BPETokenizer:
    from gpt.bpe import train_bpe

    return train_bpe([shakespeare_text[:50_000]], 400, "gpt4", ["<|endoftext|>", *specials])


def test_trained_bpe_description_is_plain_data_that_rebuilds_it(shakespeare_text, tmp_path):
    tok = small_bpe(shakespeare_text, ("<|user|>",))
    d = tok.to_dict()
    assert (d["kind"], d["name"], d["pattern"], d["special_tokens"]) == (
        "bpe",
        "bpe400",
        "gpt4",
        ["<|endoftext|>", "<|user|>"],
    )
    # The ranks as a .tiktoken file's text, which tiktoken itself reads.
    (tmp_path / "ranks.tiktoken").write_text(d["ranks"])
    assert tiktoken.load.load_tiktoken_bpe(str(tmp_path / "ranks.tiktoken")) == tok.ranks
    # Saved as a checkpoint saves it, loaded with weights_only=True.
    torch.save({"tokenizer": d}, tmp_path / "t.pt")
    again = tokenizer_from_dict(torch.load(tmp_path / "t.pt", weights_only=True)["tokenizer"])
    text = shakespeare_text[-5000:] + " café 🙂 <|endoftext|>"
    assert again.encode(text) == tok.encode(text) and again.decode(tok.encode(text)) == text
    assert (again.vocab_size, again.eot_token, again.to_dict()) == (400, 398, d)
    assert tok.eot_token not in tok.encode("<|endoftext|>")  # special-token text is ordinary text


def test_token_byte_lengths_of_a_trained_bpe(shakespeare_text):
    tok = small_bpe(shakespeare_text)
    lengths = token_byte_lengths(tok, vocab_size=416)
    assert lengths[:256].tolist() == [1.0] * 256
    assert lengths[256:399].tolist() == [len(t) for t in sorted(tok.ranks, key=tok.ranks.get)][256:]
    assert lengths[399:].tolist() == [0.0] * 17  # end-of-text and padding
