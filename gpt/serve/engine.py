"""Continuous batching on the KV cache: requests join the running decode batch between two steps
and leave it when they are done, and each row is computed as if it were alone (as generate.py
would compute it).

One KV cache of max_batch rows and block_size slots is shared by every request, each row right
aligned at the cache's position, its left padding masked (`pad`). A newcomer is prefilled alone, in
a cache shaped as generate.py's, and its keys and values are copied into a free row; then one decode
step runs for every row. A row that outgrows block_size slides as generate.py's does (its last
block_size // 2 tokens prefilled again, alone); when the cache's last slot is used, every row is
moved left by the padding they all have. Sampling is per row, with the request's own settings and
seeded generator, so what a request gets does not depend on what else runs.

The engine's loop runs in a thread of its own (model steps block), or, with start=False, in the
thread that calls `run` (serve.py: the main thread, the HTTP server in another; torch's parallel
regions run at half speed in a second thread once the main one has run any). `submit` and
`Request.cancel` may be called from any thread, and a request's `on_text` is called from the
engine's.
"""

from __future__ import annotations

import copy
import threading
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from gpt.config import SamplingConfig
from gpt.generate.text import TextStream
from gpt.generate.tokens import decode_step, prefill, sample_next
from gpt.model.kv_cache import KVCache
from gpt.model.transformer import GPT
from gpt.tokenizer import Tokenizer


class QueueFull(Exception):
    """More requests wait than the engine was told to queue."""


@dataclass(eq=False)
class Request:
    """One completion: prompt tokens in; text pieces out through on_text(piece, finish_reason),
    finish_reason None until the last call ("stop": end-of-text or a stop string; "length":
    max_tokens; "cancelled"; "error": the engine failed, its traceback on stderr)."""

    ids: list[int]
    max_tokens: int
    on_text: Callable[[str, str | None], object]
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    completion_tokens: int = 0
    cancelled: bool = False

    def cancel(self) -> None:
        """Free this request's row before the next step (a client that went away)."""
        self.cancelled = True


@dataclass(eq=False)
class _Row:
    request: Request
    window: list[int]  # the tokens in the cache (what generate.py's Context holds for this row)
    cache_len: int  # max_len of the cache generate.py would give it: a slide is prefilled in one
    stream: TextStream
    generator: torch.Generator | None
    logits: torch.Tensor  # (V,): for the next token


class Engine:
    def __init__(
        self, model: GPT, tokenizer: Tokenizer, max_batch: int = 16, max_queue: int = 64, start: bool = True
    ) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.block = model.config.block_size
        self.max_queue = max_queue
        param = next(model.parameters())
        self.device = param.device
        self.cache = KVCache.for_model(model.config, max_batch, device=self.device, dtype=param.dtype)
        self.pad = torch.zeros(max_batch, dtype=torch.long, device=self.device)
        self.rows: list[_Row | None] = [None] * max_batch
        self.waiting: deque[Request] = deque()
        self.wake = threading.Condition()
        self.running = True
        self.thread = None
        if start:
            self.thread = threading.Thread(target=self.run, name="gpt-engine", daemon=True)
            self.thread.start()

    # ------------------------------------------------------------------------- any thread

    def submit(self, request: Request) -> None:
        with self.wake:
            if len(self.waiting) >= self.max_queue + self.rows.count(None):
                raise QueueFull(f"{self.active} requests run and {len(self.waiting)} wait")
            self.waiting.append(request)
            self.wake.notify()

    @property
    def active(self) -> int:
        return sum(row is not None for row in self.rows)

    @property
    def queued(self) -> int:
        return len(self.waiting)

    def close(self) -> None:
        with self.wake:
            self.running = False
            self.wake.notify()
        if self.thread is not None:
            self.thread.join()

    # ------------------------------------------------------------------------- the engine's thread

    def run(self, until: Callable[[], bool] = lambda: False) -> None:
        """The engine's loop, in the calling thread: until close() or, checked every half second
        while idle, until() is true."""
        with torch.inference_mode():
            while True:
                with self.wake:
                    while self.running and not self.waiting and not self.active and not until():
                        self.wake.wait(0.5)
                    if not self.running or until():
                        return
                try:
                    self.step()
                except Exception:  # noqa: BLE001  a bug must not hang every client: fail them, go on
                    traceback.print_exc()
                    self._fail_all()

    def _fail_all(self) -> None:
        """End every request with finish reason "error" and start from an empty cache."""
        with self.wake:
            failed = [row.request for row in self.rows if row is not None] + list(self.waiting)
            self.waiting.clear()
        self.rows = [None] * len(self.rows)
        self.cache.reset()
        for request in failed:
            request.on_text("", "error")

    def step(self) -> None:
        """Admit newcomers, sample one token for every row, then compute every row's next logits."""
        self._admit()
        for i, row in enumerate(self.rows):
            if row is None:
                continue
            piece, finish = self._sample(row)
            if finish is not None:
                self.rows[i] = None  # free before the request hears it is done
            if piece or finish is not None:
                row.request.on_text(piece, finish)
        self._advance()

    def _admit(self) -> None:
        while None in self.rows:
            with self.wake:
                if not self.waiting:
                    return
                request = self.waiting.popleft()
            if request.cancelled:
                request.on_text("", "cancelled")
                continue
            window = request.ids[-self.block :]  # generate.py crops a long prompt the same way
            cache_len = min(self.block, len(window) + request.max_tokens)
            logits, alone = self._prefill_alone(window, cache_len)
            i = self.rows.index(None)
            self._place(i, alone, len(window))
            generator = None
            if request.seed is not None:
                generator = torch.Generator(device=self.device).manual_seed(request.seed)
            stream = TextStream(self.tokenizer, request.stop)
            self.rows[i] = _Row(request, window, cache_len, stream, generator, logits)

    def _sample(self, row: _Row) -> tuple[str, str | None]:
        """Draw the row's next token: (its final text, the finish reason or None)."""
        request = row.request
        if request.cancelled:
            return "", "cancelled"
        s = request.sampling
        logits = row.logits[None, : self.tokenizer.vocab_size]  # (1, V)
        token = int(sample_next(logits, s.temperature, s.top_k, s.top_p, s.min_p, row.generator)[0])
        request.completion_tokens += 1
        piece = row.stream.push(token)
        if token == self.tokenizer.eot_token or row.stream.done:
            return piece + row.stream.flush(), "stop"
        if request.completion_tokens >= request.max_tokens:
            return piece + row.stream.flush(), "length"
        row.window.append(token)
        return piece, None

    def _advance(self) -> None:
        """Every live row's logits for its next token: one batched decode step for the rows that
        still fit their window, a prefill alone for a row that slides (as generate.py's Context)."""
        live = [i for i, row in enumerate(self.rows) if row is not None]
        if not live:
            self.cache.reset()
            return
        sliding = [i for i in live if len(self.rows[i].window) > self.block]
        stepping = [i for i in live if i not in sliding]
        if stepping:
            # Attention reads every row's slots up to the cache's position, padding included: drop
            # the padding all rows share (rows that joined after the others left) once it is a
            # quarter of that, or when the cache is full. A shift copies what it keeps, once; every
            # later step reads that much less (mean slots read per row 182 -> 149 with 16 requests of
            # 24 to 144 tokens coming and going; docs/benchmarks.md, "Serving").
            pos, shared = int(self.cache.pos), min(int(self.pad[i]) for i in stepping)
            if shared and (pos + 1 > self.cache.max_len or 4 * shared >= pos):
                self._shift(-shared, rows=self._rows_in_use())
            token = torch.zeros(len(self.rows), 1, dtype=torch.long, device=self.device)
            for i in stepping:
                token[i, 0] = self.rows[i].window[-1]
            n = max(stepping) + 1  # rows past the last live one are left out of the step
            logits = decode_step(self.model, token[:n], self._rows(n), self.pad[:n])  # (n, V)
            for i in stepping:
                self.rows[i].logits = logits[i]
        for i in sliding:
            row = self.rows[i]
            row.window = row.window[-(self.block // 2) :]
            row.logits, alone = self._prefill_alone(row.window, row.cache_len)
            self._place(i, alone, len(row.window))

    def _rows(self, n: int) -> KVCache:
        """The cache's first n rows: views of its tensors, sharing its position."""
        view = copy.copy(self.cache)
        view.k, view.v = [t[:n] for t in self.cache.k], [t[:n] for t in self.cache.v]
        return view

    def _prefill_alone(self, window: list[int], cache_len: int) -> tuple[torch.Tensor, KVCache]:
        """The logits (V,) after `window`, and its keys and values in a one-row cache shaped as the
        one generate.py would use."""
        alone = KVCache.for_model(
            self.model.config, 1, cache_len, device=self.device, dtype=self.cache.k[0].dtype
        )
        idx = torch.tensor([window], dtype=torch.long, device=self.device)
        return prefill(self.model, idx, alone)[0], alone

    def _place(self, i: int, alone: KVCache, n: int) -> None:
        """Copy the first n slots of a one-row cache into row i, ending at the shared position."""
        pos = int(self.cache.pos)
        if pos < n:
            self._shift(n - pos, rows=self._rows_in_use())
            pos = n
        for big, small in zip((*self.cache.k, *self.cache.v), (*alone.k, *alone.v), strict=True):
            big[i, :, pos - n : pos] = small[0, :, :n]
        self.pad[i] = pos - n

    def _rows_in_use(self) -> int:
        """How many rows, from the first, reach the last live one (0 when none is)."""
        return 1 + max((i for i, row in enumerate(self.rows) if row is not None), default=-1)

    def _shift(self, by: int, rows: int | None = None) -> None:
        """Move the first `rows` rows (all: None) `by` slots, left when negative; keys and values do
        not depend on their slot (positions count from each row's padding), so the rows stay as they
        were. Rows past them hold nothing live: a newcomer placed there writes all it needs."""
        pos = int(self.cache.pos)
        for t in (*self.cache.k, *self.cache.v):
            t = t[:rows]
            if by < 0:
                t[:, :, : pos + by] = t[:, :, -by:pos].clone()
            else:
                t[:, :, by : pos + by] = t[:, :, :pos].clone()
        self.cache.pos += by
        self.pad += by
        self.pad.clamp_(min=0)
