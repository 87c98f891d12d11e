"""Where a corpus comes from: Tiny Shakespeare (downloaded once), files and folders (globs, gzip, jsonl),
Hugging Face datasets; each read as a stream of documents."""

from __future__ import annotations

import codecs
import fnmatch
import gzip
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import urllib.request
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from gpt.config import DEFAULT_INCLUDE, DataConfig
from gpt.errors import UserError

SHAKESPEARE_FILE = "tinyshakespeare.txt"
SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
READ_BYTES = 1 << 20

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


def find_or_download(root: Path, name: str, url: str, sha256: str, what: str, verify: bool = False) -> Path:
    """<root>/<name>, downloaded there from `url` (checked against `sha256`) when absent; with
    `verify`, a file already there is checked too. `what` names the file in the lines printed."""
    path = root / name
    if path.is_file():
        got = sha256_file(path) if verify else sha256
        if got != sha256:
            raise UserError(
                f"{path}: its sha256 does not match ({got}, expected {sha256}); it should be {what} from "
                f"{url}; delete it to download it again"
            )
        return path
    try:
        print(f"{what} not found in {root}/: downloading {url}", file=sys.stderr)
        return download(url, path, sha256)
    except OSError as e:  # URLError, timeouts and permission errors are all OSErrors
        raise UserError(
            f"{what} is not in {root}/ and could not be downloaded ({e}); put {name} (from {url}) there "
            "or set GPT_DATA_DIR to the folder that holds it"
        ) from e


def find_shakespeare(root: Path) -> Path:
    return find_or_download(root, SHAKESPEARE_FILE, SHAKESPEARE_URL, SHAKESPEARE_SHA256, "Tiny Shakespeare")


def is_jsonl(path: Path) -> bool:
    return path.name.removesuffix(".gz").endswith(".jsonl")


def glob_matcher(globs: list[str]) -> Callable[[str], bool]:
    """Whether a relative path matches any of `globs` (fnmatch-style), as one regular expression: a
    folder of many files is checked against many globs."""
    pattern = re.compile("|".join(fnmatch.translate(g) for g in globs)) if globs else None
    return lambda rel: pattern is not None and pattern.match(rel) is not None


def is_folder(cfg: DataConfig) -> bool:
    """Whether data.path is a folder whose files the globs choose."""
    return cfg.source != "hf" and bool(cfg.path) and Path(cfg.path).expanduser().is_dir()


def find_files(cfg: DataConfig) -> list[Path]:
    """The corpus files, in a stable (sorted) order."""
    if cfg.source == "shakespeare" and not cfg.path:
        return [find_shakespeare(data_root(cfg))]
    path = Path(cfg.path).expanduser()
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise UserError(f"data.path {str(path)!r} does not exist; pass a text file or a folder of text files")
    include, exclude = glob_matcher(cfg.include), glob_matcher(cfg.exclude)
    files = sorted(
        p
        for p in path.rglob("*")
        if p.is_file() and include(rel := p.relative_to(path).as_posix()) and not exclude(rel)
    )
    if not files:
        raise UserError(nothing_to_read(cfg, path, include, exclude))
    return files


# A file type the advice of nothing_to_read can name in a glob that Hydra reads unquoted.
SUFFIX = re.compile(r"(\.[A-Za-z0-9_]+)(\.gz)?$")


def nothing_to_read(cfg: DataConfig, path: Path, include: Callable, exclude: Callable) -> str:
    """Why no file of the folder `path` is read, and the override that reads the ones it has."""
    rels = [p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()]
    if not rels:
        return f"{path} holds no files; point data.path at a text file or a folder of text files"
    kept = [r for r in rels if not exclude(r)]
    if not kept or any(include(r) for r in rels):
        which = "every file" if not kept else "every file that data.include takes"
        return f"{which} under {path} is left out by data.exclude={list(cfg.exclude)}; change data.exclude"
    globs = (
        " (the default: common text and source-code extensions, listed in docs/data.md)"
        if list(cfg.include) == list(DEFAULT_INCLUDE)
        else f"={list(cfg.include)}"
    )
    counts = Counter(m[0] for r in kept if (m := SUFFIX.search(r.rsplit("/", 1)[-1])))
    lead = f"no files under {path} match data.include{globs}"
    if not counts:  # only names without an extension (README, LICENSE) left
        return f"{lead}; to read every file, 'data.include=[*]'"
    top = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:3]
    held = ", ".join(f"*{suffix} ({n} file{'s' * (n > 1)})" for suffix, n in top)
    globs = ",".join(f"*{suffix}" for suffix, _ in top)
    return f"{lead}; it holds {held}: to read them, 'data.include=[{globs}]'"


# ----------------------------------------------------------------------------- reading documents


def open_binary(path: Path) -> tuple[BinaryIO, BinaryIO]:
    """(stream of the file's content, the file on disk); the second's tell() measures progress."""
    raw = open(path, "rb")  # noqa: SIM115  (closed by the caller, with the stream)
    if path.name.endswith(".gz"):
        return gzip.GzipFile(fileobj=raw, mode="rb"), raw
    return raw, raw


class NotUTF8(ValueError):
    """A byte that is not UTF-8, at `offset` of the (decompressed) file."""

    def __init__(self, offset: int) -> None:
        super().__init__(f"not UTF-8 near offset {offset}")
        self.offset = offset


def text_pieces(path: Path) -> Iterator[tuple[str, bytes, int]]:
    """The file's text decoded (strict UTF-8) piece by piece, as (text, its bytes, bytes read from
    the disk so far); the last piece is empty. NotUTF8 for a byte that is not UTF-8, a UserError for
    a broken gzip stream."""
    stream, raw = open_binary(path)
    decoder = codecs.getincrementaldecoder("utf-8")()
    seen = 0
    with stream, raw:
        while True:
            try:
                data = stream.read(READ_BYTES)
            except (OSError, EOFError, zlib.error) as e:
                raise _bad_gzip(path, e) from None
            try:
                text = decoder.decode(data, final=not data)
            except UnicodeDecodeError as e:
                raise NotUTF8(seen + e.start) from None
            yield text, data, raw.tell()
            seen += len(data)
            if not data:
                return


def not_text(path: Path) -> str | None:
    """Why the file at `path` (gzip-compressed or not) is not text: a byte that is not UTF-8 or a NUL
    byte; None when it is text. Read in pieces, as the corpus is; a broken gzip stream is an error."""
    seen = 0
    try:
        for _, data, _ in text_pieces(path):
            if b"\x00" in data:
                return f"a NUL byte at offset {seen + data.index(0)}"
            seen += len(data)
    except NotUTF8 as e:
        return str(e)
    return None


def text_files(cfg: DataConfig, files: list[Path]) -> tuple[list[Path], list[str]]:
    """A folder's files (find_files) parted into those that are UTF-8 text and those that are not,
    as "relative path: why", which the prepare step skips. Anything else is read as it is: a file
    named by data.path that is not text stops the prepare step with one line."""
    if not is_folder(cfg):
        return files, []
    root = Path(cfg.path).expanduser()
    text, skipped = [], []
    for path in files:
        why = not_text(path)
        if why is None:
            text.append(path)
        else:
            skipped.append(f"{path.relative_to(root).as_posix()}: {why}")
    if len(files) == len(skipped) == 1:
        raise UserError(
            f"the one file under {root} that data.include takes is not UTF-8 text ({skipped[0]}); "
            "convert it to UTF-8, or choose others with data.include"
        )
    if not text:
        raise UserError(
            f"none of the {len(files):,} files under {root} that data.include takes is UTF-8 text "
            f"({skipped[0]}, ...); convert them to UTF-8, or choose others with data.include"
        )
    return text, skipped


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
    done = 0
    try:
        for text, _, read in text_pieces(path):
            progress(read - done)
            done = read
            if text:
                yield _check_text(path, text)
    except NotUTF8 as e:
        raise _bad_utf8(path, e.offset) from None


def jsonl_rows(path: Path, progress: Callable[[int], None] | None = None) -> Iterator[tuple[int, Any]]:
    """(line number, parsed JSON) of each non-blank line of a .jsonl or .jsonl.gz file; a line that
    is not JSON or not UTF-8, or a broken gzip stream, ends in one line naming the file and line."""
    stream, raw = open_binary(path)
    done = 0
    with stream, raw:
        try:
            for lineno, line in enumerate(stream, 1):
                if progress is not None and lineno % 1024 == 0:
                    progress(raw.tell() - done)
                    done = raw.tell()
                if not line.strip():
                    continue
                try:
                    yield lineno, json.loads(line)
                except UnicodeDecodeError:
                    raise UserError(f"{path}:{lineno} is not UTF-8 text; convert the file to UTF-8") from None
                except ValueError as e:
                    raise UserError(
                        f"{path}:{lineno} is not JSON ({e.args[0].split(':')[0]}); each line of a .jsonl "
                        "file must be one JSON object"
                    ) from None
        except (OSError, EOFError, zlib.error) as e:
            raise _bad_gzip(path, e) from None
        if progress is not None:
            progress(raw.tell() - done)


def read_jsonl_file(path: Path, field: str, progress: Callable[[int], None]) -> Iterator[str]:
    """One document per non-blank line: the string in `field` of the line's JSON object."""
    for lineno, obj in jsonl_rows(path, progress):
        text = obj.get(field) if isinstance(obj, dict) else None
        if not isinstance(text, str):
            raise UserError(
                f"{path}:{lineno} has no string field {field!r}; set data.text_field to the field "
                "that holds the text"
            )
        yield _check_text(path, text, f":{lineno}")


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
