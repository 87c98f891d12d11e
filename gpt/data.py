"""Text -> token file (numpy memmap) + meta.json, and a LightningDataModule of random windows.

`prepare(cfg)` finds the corpus (an explicit path; the data root, env GPT_DATA_DIR; a checked
download), tokenizes it once and caches the result under `cfg.cache_dir` keyed by a fingerprint of
(sources, tokenizer, split). It writes into a temporary folder and renames it into place, so an
interrupted prepare never leaves a folder a later run would trust.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from gpt.config import DataConfig
from gpt.errors import UserError
from gpt.tokenizer import CharTokenizer, TiktokenTokenizer, get_tokenizer, tokenizer_from_dict

SHAKESPEARE_FILE = "tinyshakespeare.txt"
SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
TEXT_SUFFIXES = (".txt", ".md")
FORMAT_VERSION = 1

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


def find_sources(cfg: DataConfig) -> list[Path]:
    """The corpus files, in a stable order."""
    if cfg.source == "shakespeare" and not cfg.path:
        return [find_shakespeare(data_root(cfg))]
    path = Path(cfg.path)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
        if not files:
            raise UserError(f"no {'/'.join(TEXT_SUFFIXES)} files under {path}; point data.path at text")
        return files
    raise UserError(f"data.path {str(path)!r} does not exist; pass a text file or a folder of text files")


def read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(
            f"{path} is not UTF-8 text (bad byte at offset {e.start}); convert or remove it"
        ) from None


# ----------------------------------------------------------------------------- tokenizing


@dataclass(frozen=True)
class Prepared:
    """A tokenized corpus on disk: train.bin, val.bin and meta.json in `dir`."""

    dir: Path
    meta: dict[str, Any]

    def tokenizer(self) -> CharTokenizer | TiktokenTokenizer:
        return tokenizer_from_dict(self.meta["tokenizer"])

    def tokens(self, split: str) -> np.memmap:
        return np.memmap(self.dir / f"{split}.bin", dtype=self.meta["dtype"], mode="r")


def fingerprint(cfg: DataConfig, sources: list[Path]) -> str:
    stats = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in sources]
    key = {"v": FORMAT_VERSION, "sources": stats, "tokenizer": cfg.tokenizer, "val": cfg.val_fraction}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 2**16 else "uint32"


def tokenize(cfg: DataConfig, sources: list[Path]) -> tuple[np.ndarray, CharTokenizer | TiktokenTokenizer]:
    texts = [read_text(p) for p in sources]
    if not any(t.strip() for t in texts):
        raise UserError(f"the corpus ({', '.join(map(str, sources))}) is empty; give it some text")
    if cfg.tokenizer == "char":
        text = "\n\n".join(texts)
        tok = get_tokenizer("char", text)
        ids = np.array(tok.encode(text), dtype=token_dtype(tok.vocab_size))
        return ids, tok
    tok = get_tokenizer(cfg.tokenizer)
    docs = tok.encode_batch(texts)
    # Documents are separated by end-of-text, as GPT-2 was trained.
    joined: list[int] = []
    for i, doc in enumerate(docs):
        if i:
            joined.append(tok.eot_token)
        joined.extend(doc)
    return np.array(joined, dtype=token_dtype(tok.vocab_size)), tok


def prepare(cfg: DataConfig, verbose: bool = True) -> Prepared:
    """Tokenize the corpus into cfg.cache_dir, or return the cached result."""
    sources = find_sources(cfg)
    fp = fingerprint(cfg, sources)
    name = sources[0].stem if len(sources) == 1 else Path(cfg.path).name
    out = Path(cfg.cache_dir) / f"{name}-{cfg.tokenizer}-{fp}"
    if (out / "meta.json").is_file():
        return Prepared(out, json.loads((out / "meta.json").read_text()))

    ids, tok = tokenize(cfg, sources)
    n_val = int(len(ids) * cfg.val_fraction)
    meta = {
        "format": FORMAT_VERSION,
        "fingerprint": fp,
        "sources": [str(p) for p in sources],
        "tokenizer": tok.to_dict(),
        "vocab_size": tok.vocab_size,
        "dtype": str(ids.dtype),
        "train_tokens": len(ids) - n_val,
        "val_tokens": n_val,
        "data": asdict(cfg),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=out.name + ".tmp-"))
    try:
        ids[: len(ids) - n_val].tofile(tmp / "train.bin")
        ids[len(ids) - n_val :].tofile(tmp / "val.bin")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        try:
            os.rename(tmp, out)
        except OSError:
            # Another process prepared the same data first: theirs is equally good.
            if not (out / "meta.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if verbose:
        print(f"prepared {len(ids):,} tokens ({tok.vocab_size:,}-token vocabulary) in {out}")
    return Prepared(out, meta)


# ----------------------------------------------------------------------------- windows


class Windows(Dataset):
    """Item i is (x, y): the block_size tokens starting at offset i and the same shifted by one."""

    def __init__(self, path: Path, dtype: str, block_size: int) -> None:
        self.path, self.dtype, self.block_size = path, dtype, block_size
        self._tokens: np.memmap | None = None  # opened lazily, once per worker process
        self.n_tokens = os.path.getsize(path) // np.dtype(dtype).itemsize

    def __len__(self) -> int:
        return self.n_tokens - self.block_size

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._tokens is None:
            self._tokens = np.memmap(self.path, dtype=self.dtype, mode="r")
        chunk = torch.from_numpy(self._tokens[i : i + self.block_size + 1].astype(np.int64))
        return chunk[:-1], chunk[1:]


class RandomWindowSampler(Sampler[int]):
    """Uniformly random window offsets from one seeded stream that the ranks share out.

    The stream depends on (seed, epoch) only; rank r of W takes items r, r+W, r+2W, ... So a
    global batch holds the same windows whatever the number of devices, accumulation steps and
    micro-batch size that make it up. The stream is drawn in fixed-size chunks, chunk c from its
    own generator, so it can restart at any position without replaying what came before.
    """

    CHUNK = 1 << 16

    def __init__(self, n_windows: int, length: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        # length: items this rank yields per epoch.
        self.n_windows, self.length, self.seed = n_windows, length, seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.start = 0  # items of this epoch already consumed (set when resuming)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        # The full epoch, also when resuming: Lightning counts the batches it already trained on.
        return self.length

    def _chunk(self, c: int) -> torch.Tensor:
        words = np.random.SeedSequence([self.seed, self.epoch, c]).generate_state(2)
        g = torch.Generator().manual_seed(int(words[0]) << 31 ^ int(words[1]))
        return torch.randint(self.n_windows, (self.CHUNK,), generator=g)

    def __iter__(self) -> Iterator[int]:
        # This rank's item i is item i * world_size + rank of the shared stream.
        i = self.start
        while i < self.length:
            g = i * self.world_size + self.rank
            c, j = divmod(g, self.CHUNK)
            take = min(len(range(j, self.CHUNK, self.world_size)), self.length - i)
            yield from self._chunk(c)[j :: self.world_size][:take].tolist()
            i += take

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "start": self.start}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.start = state["epoch"], state["start"]


def val_offsets(n_tokens: int, block_size: int, n_windows: int) -> list[int]:
    """Evenly spaced windows over the whole split: the same every validation, every run."""
    last = n_tokens - block_size - 1
    return torch.linspace(0, last, n_windows).round().long().unique().tolist()


class GPTDataModule(L.LightningDataModule):
    def __init__(self, cfg: DataConfig, block_size: int, seed: int = 0) -> None:
        super().__init__()
        self.cfg, self.block_size, self.seed = cfg, block_size, seed
        self._prepared: Prepared | None = None
        self._resume: dict[str, int] | None = None  # sampler state from a checkpoint

    @property
    def prepared(self) -> Prepared:
        if self._prepared is None:
            self._prepared = prepare(self.cfg)
        return self._prepared

    @property
    def tokenizer(self) -> CharTokenizer | TiktokenTokenizer:
        return self.prepared.tokenizer()

    def prepare_data(self) -> None:
        self.prepared  # noqa: B018  (tokenizes on first access)

    def setup(self, stage: str | None = None) -> None:
        meta = self.prepared.meta
        for split in ("train", "val"):
            n = meta[f"{split}_tokens"]
            if n <= self.block_size + 1:
                raise UserError(
                    f"the {split} split has {n} tokens, fewer than block_size+2 = {self.block_size + 2}; "
                    "use more text, a smaller model.block_size or a different data.val_fraction"
                )
        d = self.prepared.dir
        self.train_set = Windows(d / "train.bin", meta["dtype"], self.block_size)
        self.val_set = Windows(d / "val.bin", meta["dtype"], self.block_size)

    def _samples_per_epoch(self) -> int:
        trainer = self.trainer
        if trainer is not None and trainer.max_steps > 0:
            return trainer.max_steps * trainer.accumulate_grad_batches * self.cfg.batch_size
        # Epoch-based training: an epoch draws as many windows as fit side by side in the split.
        return max(1, self.train_set.n_tokens // self.block_size)

    def _rank_and_world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def train_dataloader(self) -> DataLoader:
        rank, world = self._rank_and_world()
        sampler = RandomWindowSampler(len(self.train_set), self._samples_per_epoch(), self.seed, rank, world)
        if self._resume is not None:
            sampler.load_state_dict(self._resume)
            self._resume = None  # later epochs start from their beginning
        return self._loader(self.train_set, sampler)

    def state_dict(self) -> dict[str, int]:
        """Where the training stream stands: the micro-batches of this epoch already trained on.

        Counted from the trainer's progress rather than the sampler's iterator, which runs ahead
        of training by whatever the DataLoader and Lightning prefetch.
        """
        trainer = self.trainer
        done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        return {"epoch": trainer.current_epoch, "start": done * self.cfg.batch_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._resume = dict(state)

    def val_dataloader(self) -> DataLoader:
        # Each rank scores its share of the windows; the token-weighted mean is synced by the metric.
        rank, world = self._rank_and_world()
        offsets = val_offsets(self.val_set.n_tokens, self.block_size, self.cfg.val_windows)[rank::world]
        return self._loader(torch.utils.data.Subset(self.val_set, offsets), None)

    def _loader(self, dataset: Dataset, sampler: Sampler | None) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.cfg.batch_size,
            sampler=sampler,
            shuffle=False,
            num_workers=self.cfg.num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.cfg.num_workers > 0,
            # A DataLoader seeds its workers from the global RNG unless given its own generator;
            # that draw would shift dropout's random stream between a resumed and an
            # uninterrupted run. Nothing in the data path is random beyond the sampler.
            generator=torch.Generator().manual_seed(self.seed),
        )
