"""Load and faults, on 127.0.0.1: 200 requests from 32 clients at once, 10% of them going away
mid-stream and 10% malformed. The server stays up, every well-formed request gets the right text,
no row stays taken, and the server's resident memory comes back to its level before. In the slow
tier (12 s); the default run checks each fault alone in test_api.py (8 clients at once, a client
leaving mid-stream, every error status)."""

from __future__ import annotations

import json
import random
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from gpt.generate.text import generate_text
from gpt.runs.checkpoint import load_model
from tests.serve.conftest import serving

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group(__name__)]
PROMPTS = ["ROMEO:", "JULIET:", "Citizen:", "O", "What", "\n", "Thou art", "A"]
MALFORMED = [
    b"{not json",
    json.dumps({"prompt": "ROMEO:"}).encode(),  # no model
    json.dumps({"model": "run", "prompt": "x", "max_tokens": -3}).encode(),
    json.dumps({"model": "run", "prompt": "x", "temperature": "hot"}).encode(),
    json.dumps({"model": "run", "prompt": "x" * 40}).encode(),  # past the context
]


def resident_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def stream(url: str, prompt: str, max_tokens: int, leave_after: int | None = None) -> str:
    """The streamed text; with leave_after, the connection is closed after that many chunks."""
    body = {"model": "run", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    text, chunks = "", 0
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            text += json.loads(line[6:])["choices"][0]["text"]
            chunks += 1
            if leave_after is not None and chunks >= leave_after:
                return text
    return text


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads resident memory from /proc")
def test_two_hundred_requests_from_32_clients_with_faults(served_run):
    model, tokenizer = load_model(served_run)
    expected = {p: generate_text(model, tokenizer, p, 20, temperature=0) for p in PROMPTS}
    rng = random.Random(0)
    kinds = ["ok"] * 160 + ["leave"] * 20 + ["malformed"] * 20
    rng.shuffle(kinds)
    with serving(served_run, "max_batch=8", "max_queue=256") as url:
        pid = int(httpx.get(f"{url}/health").json()["pid"])
        for prompt in PROMPTS:  # warm: the allocator's pools as a steady server has them
            assert stream(url, prompt, 20) == expected[prompt]
        before = resident_kb(pid)

        def one(i: int) -> tuple[str, str, str | int]:
            prompt = PROMPTS[i % len(PROMPTS)]
            if kinds[i] == "malformed":
                body = MALFORMED[i % len(MALFORMED)]
                r = httpx.post(
                    f"{url}/v1/completions",
                    content=body,
                    timeout=60,
                    headers={"Content-Type": "application/json"},
                )
                return kinds[i], prompt, r.status_code
            if kinds[i] == "leave":
                return kinds[i], prompt, stream(url, prompt, 20, leave_after=2)
            return kinds[i], prompt, stream(url, prompt, 20)

        with ThreadPoolExecutor(32) as pool:
            results = list(pool.map(one, range(len(kinds))))
        for kind, prompt, got in results:
            if kind == "ok":
                assert got == expected[prompt]
            elif kind == "malformed":
                assert got == 400, got
        deadline = time.monotonic() + 10
        while (health := httpx.get(f"{url}/health").json())["active"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert health["active"] == 0 and health["queued"] == 0
        after = resident_kb(pid)
        assert after <= before * 1.10, f"resident memory {before} kB before, {after} kB after"
        assert stream(url, "ROMEO:", 20) == expected["ROMEO:"]  # still up and right
