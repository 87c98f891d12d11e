"""Corpus -> token shards + meta.json, streamed, in parallel, cached.

`prepare(cfg)` is the one prepare step: `python -m gpt.prepare data=...` and the data module's
`prepare_data()` both call it. It

1. finds the sources: Tiny Shakespeare, a file, a folder (recursive, include/exclude globs), or a
   Hugging Face dataset. `.txt`/`.md` files are one document each, `.jsonl` lines and dataset rows
   one document each; any of the files may be gzip-compressed (`.gz`);
2. cuts documents longer than `doc_chars` at a line break into parts (a big file is read and
   tokenized piece by piece, and a one-file corpus gets a validation split); a character
   vocabulary is read from the corpus first, in a separate streamed pass;
3. tokenizes parts in batches on a pool of threads (tiktoken releases the GIL), in order, with
   memory bounded by the batches in flight, never by the corpus;
4. sends parts to val at random (a `split_seed`-ed stream of draws, one per part, so the split
   does not depend on threads or batch sizes) such that val gets `val_fraction` of the parts, to
   within one part; a corpus of fewer than 10 documents (Tiny Shakespeare is one) is split by
   tokens instead, its last `val_fraction` held out as nanoGPT does, unless it is larger than
   16M tokens, which are split by part so that memory stays bounded. Split by document, both
   splits get at least one part. Parts of different documents,
   or non-adjacent parts of one document, are separated by the tokenizer's end-of-text token (a
   blank line, "\\n\\n", for characters); adjacent parts of one document are joined without one;
5. writes `{split}-NNNNN.bin` shards (uint16 when the vocabulary fits, else uint32) into a temporary
   folder that is renamed into `cache_dir/<name>-<tokenizer>-<fingerprint>/` once complete, so an
   interrupted prepare never leaves a folder a later run would trust. The fingerprint covers the
   sources (path, size, mtime), the tokenizer and every setting that changes the output; a second
   run with the same fingerprint returns at once.

The command line, `python -m gpt.prepare data=...`, is the Hydra entry point `prepare.py` at the
repository root (next to train.py, composing the same conf/data presets): this module only hands
over to it, so that nothing in gpt/ imports Hydra.
"""

from __future__ import annotations

import codecs
import fnmatch
import gzip
import hashlib
import json
import os
import random
import shutil
import tempfile
import time
import urllib.request
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from tqdm import tqdm

from gpt.config import DataConfig
from gpt.errors import UserError
from gpt.tokenizer import CharTokenizer, TiktokenTokenizer, get_tokenizer, tokenizer_from_dict

SHAKESPEARE_FILE = "tinyshakespeare.txt"
SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
FORMAT_VERSION = 3
# Characters separating documents for the character tokenizer (BPE uses its end-of-text token).
CHAR_SEPARATOR = "\n\n"
# Fewer documents than this are too few to split by document: the corpus is split by tokens
# instead (the last val_fraction of its tokens), so a short note still gets a validation split and
# a one-file corpus such as Tiny Shakespeare keeps the split the field compares results on. Parts
# are buffered to decide; past this many tokens the corpus is split by part regardless.
MIN_DOCUMENTS_TO_SPLIT_BY_DOCUMENT = 10
MAX_TOKENS_TO_SPLIT_BY_TOKENS = 1 << 24
READ_BYTES = 1 << 20
BATCH_CHARS = 1 << 20

Tokenizer = CharTokenizer | TiktokenTokenizer

# ----------------------------------------------------------------------------- finding the corpus


def data_root(cfg: DataConfig) -> Path:
    return Path(cfg.root or os.environ.get("GPT_DATA_DIR") or "data")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download(url: str, dest: Path, sha256: str, timeout: float = 30.0) -> Path:
    """Download url to dest through a temporary file; keep it only if its sha256 matches."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=dest.name + ".", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f, urllib.request.urlopen(url, timeout=timeout) as r:
            shutil.copyfileobj(r, f)
        got = sha256_file(Path(tmp))
        if got != sha256:
            raise UserError(f"download of {url} has sha256 {got}, expected {sha256}; try again later")
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return dest


def find_shakespeare(root: Path) -> Path:
    path = root / SHAKESPEARE_FILE
    if path.is_file():
        return path
    try:
        print(f"Tiny Shakespeare not found in {root}/: downloading {SHAKESPEARE_URL}")
        return download(SHAKESPEARE_URL, path, SHAKESPEARE_SHA256)
    except OSError as e:  # URLError, timeouts and permission errors are all OSErrors
        raise UserError(
            f"Tiny Shakespeare is not in {root}/ and could not be downloaded ({e}); put "
            f"{SHAKESPEARE_FILE} there or set GPT_DATA_DIR to the folder that holds it"
        ) from e


def is_jsonl(path: Path) -> bool:
    return path.name.removesuffix(".gz").endswith(".jsonl")


def find_files(cfg: DataConfig) -> list[Path]:
    """The corpus files, in a stable (sorted) order."""
    if cfg.source == "shakespeare" and not cfg.path:
        return [find_shakespeare(data_root(cfg))]
    path = Path(cfg.path).expanduser()
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise UserError(f"data.path {str(path)!r} does not exist; pass a text file or a folder of text files")

    def wanted(rel: str) -> bool:
        return any(fnmatch.fnmatch(rel, g) for g in cfg.include) and not any(
            fnmatch.fnmatch(rel, g) for g in cfg.exclude
        )

    files = sorted(p for p in path.rglob("*") if p.is_file() and wanted(p.relative_to(path).as_posix()))
    if not files:
        raise UserError(
            f"no files under {path} match data.include={list(cfg.include)} "
            f"(data.exclude={list(cfg.exclude)}); point data.path at text or change the globs"
        )
    return files


# ----------------------------------------------------------------------------- reading documents


def open_binary(path: Path) -> tuple[BinaryIO, BinaryIO]:
    """(stream of the file's content, the file on disk); the second's tell() measures progress."""
    raw = open(path, "rb")  # noqa: SIM115  (closed by the caller, with the stream)
    if path.name.endswith(".gz"):
        return gzip.GzipFile(fileobj=raw, mode="rb"), raw
    return raw, raw


def _check_text(path: Path, text: str, where: str = "") -> str:
    if "\x00" in text:
        raise UserError(
            f"{path}{where} looks binary (it holds NUL bytes); remove it or skip it with data.exclude"
        )
    return text


def _bad_utf8(path: Path, offset: int) -> UserError:
    return UserError(
        f"{path} is not UTF-8 text (bad byte near offset {offset}); convert it, or skip it with data.exclude"
    )


def _bad_gzip(path: Path, e: Exception) -> UserError:
    return UserError(f"{path} is not a readable gzip file ({e}); recompress it or remove it")


def read_text_file(path: Path, progress: Callable[[int], None]) -> Iterator[str]:
    """One document: the file's text, decoded (strict UTF-8) piece by piece."""
    stream, raw = open_binary(path)
    decoder = codecs.getincrementaldecoder("utf-8")()
    done, seen = 0, 0
    with stream, raw:
        while True:
            try:
                data = stream.read(READ_BYTES)
            except (OSError, EOFError, zlib.error) as e:
                raise _bad_gzip(path, e) from None
            try:
                text = decoder.decode(data, final=not data)
            except UnicodeDecodeError as e:
                raise _bad_utf8(path, seen + e.start) from None
            seen += len(data)
            progress(raw.tell() - done)
            done = raw.tell()
            if text:
                yield _check_text(path, text)
            if not data:
                return


def read_jsonl_file(path: Path, field: str, progress: Callable[[int], None]) -> Iterator[str]:
    """One document per non-blank line: the string in `field` of the line's JSON object."""
    stream, raw = open_binary(path)
    done = 0
    with stream, raw:
        try:
            for lineno, line in enumerate(stream, 1):
                if lineno % 1024 == 0:
                    progress(raw.tell() - done)
                    done = raw.tell()
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except UnicodeDecodeError:
                    raise UserError(f"{path}:{lineno} is not UTF-8 text; convert the file to UTF-8") from None
                except ValueError as e:
                    raise UserError(
                        f"{path}:{lineno} is not JSON ({e.args[0].split(':')[0]}); each line of a .jsonl "
                        "file must be one JSON object"
                    ) from None
                text = obj.get(field) if isinstance(obj, dict) else None
                if not isinstance(text, str):
                    raise UserError(
                        f"{path}:{lineno} has no string field {field!r}; set data.text_field to the field "
                        "that holds the text"
                    )
                yield _check_text(path, text, f":{lineno}")
        except (OSError, EOFError, zlib.error) as e:
            raise _bad_gzip(path, e) from None
        progress(raw.tell() - done)


def hf_dataset(cfg: DataConfig) -> Iterable[dict[str, Any]]:
    """A Hugging Face dataset's rows: a folder written by save_to_disk, or a Hub name (streamed)."""
    try:
        # Optional: only this source needs the `datasets` package, so it is imported here.
        import datasets
    except ImportError:
        raise UserError("data=hf needs the Hugging Face datasets package: pip install datasets") from None
    path = Path(cfg.path).expanduser()
    if path.is_dir():
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if cfg.hf_split not in ds:
                raise UserError(
                    f"{path} has no split {cfg.hf_split!r} (it has {', '.join(ds)}); set data.hf_split"
                )
            ds = ds[cfg.hf_split]
        return ds
    try:
        return datasets.load_dataset(cfg.path, cfg.hf_config, split=cfg.hf_split, streaming=True)
    except Exception as e:  # the Hub and the loaders raise many types for a wrong name or no network
        raise UserError(
            f"could not open the Hugging Face dataset {cfg.path!r} ({type(e).__name__}: {e})"
        ) from e


def read_hf(cfg: DataConfig, progress: Callable[[int], None]) -> Iterator[Iterator[str]]:
    for i, row in enumerate(hf_dataset(cfg)):
        text = row.get(cfg.text_field)
        if not isinstance(text, str):
            raise UserError(
                f"row {i} of {cfg.path} has no string field {cfg.text_field!r}; set data.text_field"
            )
        progress(len(text))
        yield iter([text])


def read_documents(
    cfg: DataConfig, files: list[Path], progress: Callable[[int], None]
) -> Iterator[Iterator[str]]:
    """Each document as an iterator over its text, in a stable order."""
    if cfg.source == "hf":
        yield from read_hf(cfg, progress)
        return
    for path in files:
        if is_jsonl(path):
            for text in read_jsonl_file(path, cfg.text_field, progress):
                yield iter([text])
        else:
            yield read_text_file(path, progress)


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
    """The `index`-th part of document `doc`, and its text (dropped once tokenized)."""

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


def token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 2**16 else "uint32"


def char_vocabulary(parts: Iterable[Part]) -> CharTokenizer:
    """The first pass of a character corpus: its set of characters (plus the separator's)."""
    chars: set[str] = set(CHAR_SEPARATOR)
    for part in parts:
        chars.update(part.text)
    return CharTokenizer("".join(sorted(chars)))


def make_encoder(tok: Tokenizer, dtype: str) -> Callable[[list[str]], list[np.ndarray]]:
    if isinstance(tok, CharTokenizer):
        # Characters sort by code point, so an id is the character's rank among the vocabulary's.
        code_points = np.array([ord(c) for c in tok.chars], dtype=np.uint32)

        def encode_chars(texts: list[str]) -> list[np.ndarray]:
            out = []
            for text in texts:
                cps = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
                ids = np.searchsorted(code_points, cps)
                if ids.size and (ids.max() >= len(code_points) or (code_points[ids] != cps).any()):
                    raise UserError("the corpus changed while it was being prepared; run the prepare again")
                out.append(ids.astype(dtype))
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
    """Tokenize batches of parts on `workers` threads; results come back in corpus order.

    At most 2 x workers batches are in flight, so memory does not grow with the corpus.
    """
    with ThreadPoolExecutor(workers) as pool:
        pending: deque = deque()
        for batch in batches(parts, BATCH_CHARS):
            pending.append((batch, pool.submit(encode, [p.text for p in batch])))
            if len(pending) >= 2 * workers:
                done, future = pending.popleft()
                yield from ((Part(p.doc, p.index), ids) for p, ids in zip(done, future.result(), strict=True))
        while pending:
            done, future = pending.popleft()
            yield from ((Part(p.doc, p.index), ids) for p, ids in zip(done, future.result(), strict=True))


# ----------------------------------------------------------------------------- writing shards


class ShardWriter:
    """Appends tokens to `{split}-00000.bin`, `{split}-00001.bin`, ... of at most shard_tokens each."""

    def __init__(self, folder: Path, split: str, dtype: str, shard_tokens: int) -> None:
        self.folder, self.split, self.dtype, self.shard_tokens = folder, split, dtype, shard_tokens
        self.shards: list[dict[str, Any]] = []
        self.n_tokens = 0
        self._file: BinaryIO | None = None

    def write(self, ids: np.ndarray) -> None:
        ids = ids.astype(self.dtype, copy=False)
        while ids.size:
            if self._file is None or self.shards[-1]["tokens"] == self.shard_tokens:
                self._next_shard()
            room = self.shard_tokens - self.shards[-1]["tokens"]
            head, ids = ids[:room], ids[room:]
            self._file.write(head.tobytes())
            self.shards[-1]["tokens"] += head.size
            self.n_tokens += head.size

    def _next_shard(self) -> None:
        if self._file is not None:
            self._file.close()
        name = f"{self.split}-{len(self.shards):05d}.bin"
        self._file = open(self.folder / name, "wb")  # noqa: SIM115  (closed in _next_shard / close)
        self.shards.append({"file": name, "tokens": 0})

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class Splitter:
    """Routes tokenized parts to the train and val writers (see the module docstring, step 4).

    The last part of each split is held back until the next one arrives, so that at the end a split
    that got no part can take the other split's last one instead of being empty.
    """

    def __init__(self, writers: dict[str, ShardWriter], val_fraction: float, seed: int, sep: np.ndarray):
        self.writers, self.val_fraction, self.sep = writers, val_fraction, sep
        self.rng = random.Random(seed)
        self.first: list[tuple[Part, np.ndarray, str]] = []
        self.held: dict[str, tuple[Part, np.ndarray] | None] = {"train": None, "val": None}
        self.last: dict[str, Part | None] = {"train": None, "val": None}
        self.n_parts = 0
        self.credit = 0.0
        self.by_document = False
        self.first_docs: set[int] = set()
        self.first_tokens = 0

    def add(self, part: Part, ids: np.ndarray) -> None:
        # Randomized error diffusion: a part goes to val with probability `credit`, the val_fraction
        # accumulated since the last val part. The count of val parts stays within one of
        # val_fraction x parts, even for a few dozen parts, while which ones is drawn at random.
        self.credit += self.val_fraction
        split = "val" if self.rng.random() < self.credit else "train"
        self.credit -= split == "val"
        self.n_parts += 1
        if self.by_document:
            self._route(part, ids, split)
            return
        self.first.append((part, ids, split))
        self.first_docs.add(part.doc)
        self.first_tokens += len(ids)
        if (
            len(self.first_docs) >= MIN_DOCUMENTS_TO_SPLIT_BY_DOCUMENT
            or self.first_tokens >= MAX_TOKENS_TO_SPLIT_BY_TOKENS
        ):
            self.by_document = True
            for args in self.first:
                self._route(*args)
            self.first = []

    def _route(self, part: Part, ids: np.ndarray, split: str) -> None:
        if self.held[split] is not None:
            self._write(split, *self.held[split])
        self.held[split] = (part, ids)

    def _write(self, split: str, part: Part, ids: np.ndarray) -> None:
        last = self.last[split]
        if last is not None and not (last.doc == part.doc and last.index + 1 == part.index):
            self.writers[split].write(self.sep)
        self.writers[split].write(ids)
        self.last[split] = part

    def finish(self) -> str:
        """Write what is held back; returns how the corpus was split ("documents" or "tokens")."""
        if not self.by_document:
            return self._split_by_tokens()
        for split, other in (("val", "train"), ("train", "val")):
            if self.held[split] is None and self.last[split] is None:
                self.held[split], self.held[other] = self.held[other], None
        for split in ("train", "val"):
            if self.held[split] is not None:
                self._write(split, *self.held[split])
        return "documents"

    def _split_by_tokens(self) -> str:
        # Only reached with few documents and tokens, all held in self.first.
        stream: list[np.ndarray] = []
        last: Part | None = None
        for part, ids, _ in self.first:
            if last is not None and not (last.doc == part.doc and last.index + 1 == part.index):
                stream.append(self.sep)
            stream.append(ids)
            last = part
        ids = np.concatenate(stream) if stream else self.sep[:0]
        n_val = int(len(ids) * self.val_fraction)
        self.writers["train"].write(ids[: len(ids) - n_val])
        self.writers["val"].write(ids[len(ids) - n_val :])
        return "tokens"


# ----------------------------------------------------------------------------- the prepare step


@dataclass(frozen=True)
class Prepared:
    """A tokenized corpus on disk: `{split}-NNNNN.bin` shards and meta.json in `dir`."""

    dir: Path
    meta: dict[str, Any]
    # True when this call tokenized the corpus, False when it was found in the cache.
    fresh: bool = False

    def tokenizer(self) -> Tokenizer:
        return tokenizer_from_dict(self.meta["tokenizer"])

    def shard_paths(self, split: str) -> list[Path]:
        return [self.dir / s["file"] for s in self.meta["shards"][split]]

    def check_fits(self, block_size: int) -> None:
        """Each split must hold at least one training window (block_size + 1 tokens, and one more)."""
        for split in ("train", "val"):
            n = self.meta[f"{split}_tokens"]
            if n <= block_size + 1:
                raise UserError(
                    f"the {split} split has {n} tokens, fewer than block_size+2 = {block_size + 2}; "
                    "use more text, a smaller model.block_size or a different data.val_fraction"
                )

    def tokens(self, split: str) -> np.ndarray:
        """The whole split in memory, for small corpora and tests; training reads the shards."""
        parts = [np.fromfile(p, dtype=self.meta["dtype"]) for p in self.shard_paths(split)]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=self.meta["dtype"])


def fingerprint(cfg: DataConfig, files: list[Path], tok_key: dict[str, Any]) -> str:
    """Hash of everything the output depends on: sources (path, size, mtime), tokenizer, settings."""
    h = hashlib.sha256()
    settings = {
        k: getattr(cfg, k)
        for k in ("source", "include", "exclude", "text_field", "hf_config", "hf_split", "val_fraction")
        + ("split_seed", "doc_chars", "shard_tokens")
    }
    h.update(
        json.dumps({"v": FORMAT_VERSION, "tokenizer": tok_key, "settings": settings}, sort_keys=True).encode()
    )
    if cfg.source == "hf" and not Path(cfg.path).expanduser().is_dir():
        h.update(cfg.path.encode())  # a Hub dataset: its name (delete the cache folder to refetch)
    if cfg.source == "hf" and Path(cfg.path).expanduser().is_dir():
        files = sorted(p for p in Path(cfg.path).expanduser().rglob("*") if p.is_file())
    for p in files:
        st = p.stat()
        h.update(f"{p.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def cache_name(cfg: DataConfig, files: list[Path], tok_name: str) -> str:
    if cfg.source == "hf":
        name = Path(cfg.path).name or "hf"
    else:
        name = files[0].name.split(".")[0] if len(files) == 1 else Path(cfg.path).expanduser().resolve().name
    return f"{name}-{tok_name}"


class Meter:
    """The progress bar: bytes read (the bar) and tokens written per second (its postfix)."""

    def __init__(self, total: int | None, desc: str, verbose: bool) -> None:
        self.bar = tqdm(total=total, desc=desc, unit="B", unit_scale=True, disable=not verbose, leave=verbose)
        self.tokens, self.t0 = 0, time.perf_counter()

    def read(self, n: int) -> None:
        self.bar.update(n)

    def wrote(self, n: int) -> None:
        self.tokens += n
        rate = self.tokens / max(time.perf_counter() - self.t0, 1e-9)
        self.bar.set_postfix_str(f"{self.tokens:,} tokens, {rate / 1e6:.2f}M tok/s", refresh=False)

    def close(self) -> None:
        self.bar.close()


def prepare(cfg: DataConfig, tokenizer: TiktokenTokenizer | None = None, verbose: bool = True) -> Prepared:
    """Tokenize the corpus into cfg.cache_dir, or return the cached result.

    `tokenizer` overrides cfg.tokenizer with a BPE tokenizer built in code (tests use it).
    """
    files = [] if cfg.source == "hf" else find_files(cfg)
    tok: Tokenizer | None = tokenizer
    if tok is None and cfg.tokenizer != "char":
        tok = get_tokenizer(cfg.tokenizer)  # a character vocabulary is built below, from the corpus
    tok_key = {"kind": "char"} if tok is None else tok.to_dict() | {"n_vocab": tok.vocab_size}
    tok_name = "char" if tok is None else tok.name
    out = Path(cfg.cache_dir) / f"{cache_name(cfg, files, tok_name)}-{fingerprint(cfg, files, tok_key)}"
    if (out / "meta.json").is_file():
        return Prepared(out, json.loads((out / "meta.json").read_text()))

    total = sum(p.stat().st_size for p in files) or None
    t0 = time.perf_counter()
    if tok is None:
        meter = Meter(total, "characters", verbose)
        try:
            tok = char_vocabulary(iter_parts(cfg, files, meter.read))
        finally:
            meter.close()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=out.name + ".tmp-"))
    try:
        meta = write_shards(cfg, files, tok, tmp, total, verbose)
        meta["seconds"] = round(time.perf_counter() - t0, 3)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        try:
            os.rename(tmp, out)
        except OSError:
            # Another process prepared the same data first: theirs is equally good.
            if not (out / "meta.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    meta = json.loads((out / "meta.json").read_text())
    if verbose:
        print(
            f"prepared {meta['train_tokens'] + meta['val_tokens']:,} tokens ({tok.vocab_size:,}-token "
            f"vocabulary, {meta['parts']:,} parts, val {meta['val_tokens']:,} tokens split by "
            f"{meta['split_by']}) in {out}"
        )
    return Prepared(out, meta, fresh=True)


def write_shards(
    cfg: DataConfig, files: list[Path], tok: Tokenizer, folder: Path, total: int | None, verbose: bool
) -> dict[str, Any]:
    """The second pass: tokenize, split and write; returns the meta.json content."""
    dtype = token_dtype(tok.vocab_size)
    encode = make_encoder(tok, dtype)
    sep = encode([CHAR_SEPARATOR])[0] if isinstance(tok, CharTokenizer) else np.array([tok.eot_token], dtype)
    writers = {s: ShardWriter(folder, s, dtype, cfg.shard_tokens) for s in ("train", "val")}
    splitter = Splitter(writers, cfg.val_fraction, cfg.split_seed, sep)
    workers = cfg.prepare_workers or len(os.sched_getaffinity(0))
    meter = Meter(total, "tokenizing", verbose)
    counter = PartCounter()
    try:
        for part, ids in encode_parts(counter(iter_parts(cfg, files, meter.read)), encode, workers):
            splitter.add(part, ids)
            meter.wrote(ids.size)
        split_by = splitter.finish()
    finally:
        meter.close()
        for w in writers.values():
            w.close()
    if not counter.has_text:
        where = cfg.path if cfg.path else ", ".join(map(str, files))
        raise UserError(f"the corpus ({where}) is empty; give it some text")
    return {
        "format": FORMAT_VERSION,
        "sources": len(files) if cfg.source != "hf" else cfg.path,
        "first_source": str(files[0]) if files else cfg.path,
        "tokenizer": tok.to_dict(),
        "vocab_size": tok.vocab_size,
        "dtype": dtype,
        "documents": counter.documents,
        "parts": splitter.n_parts,
        "split_by": split_by,
        "train_tokens": writers["train"].n_tokens,
        "val_tokens": writers["val"].n_tokens,
        "shards": {s: w.shards for s, w in writers.items()},
        "data": asdict(cfg),
    }


if __name__ == "__main__":
    # `python -m gpt.prepare data=...`: hand over to the Hydra entry point next to train.py, which
    # composes the same conf/ tree (the library itself never imports Hydra).
    import runpy

    runpy.run_path(str(Path(__file__).resolve().parents[1] / "prepare.py"), run_name="__main__")
