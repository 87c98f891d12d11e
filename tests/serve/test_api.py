"""serve.py through the official `openai` client, as users' tools talk to it: completions and chat,
streamed and not, the same tokens as generate.py, 8 clients at once, and every error status."""

from __future__ import annotations

import contextlib
import json
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from gpt.generate.text import generate_text
from gpt.runs.checkpoint import load_model
from gpt.templates import format_prompt, get_template
from tests.helpers import free_port, last_line, run_forked, start_forked
from tests.serve.conftest import serving

pytestmark = pytest.mark.xdist_group(__name__)  # one server for the module's tests
KEY = "sekret"


@pytest.fixture(scope="module")
def url(served_run):
    with serving(served_run, f"api_key={KEY}", "max_body_bytes=4096") as url:
        yield url


@pytest.fixture(scope="module")
def client(url) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def model_name(client) -> str:
    (model,) = client.models.list().data
    return model.id


@pytest.fixture(scope="module")
def local(served_run):
    """The same checkpoint in this process: what generate.py computes."""
    return load_model(served_run)


def alone(local, prompt: str, max_tokens: int, **settings) -> str:
    model, tokenizer = local
    return generate_text(model, tokenizer, prompt, max_tokens, **settings)


def test_models_lists_the_run(model_name, served_run):
    assert model_name == "run" and served_run.name == "run"


def test_completion_is_generate_pys_and_streams_the_same_text(client, model_name, local):
    done = client.completions.create(model=model_name, prompt="ROMEO:", max_tokens=20, temperature=0)
    assert done.choices[0].text == alone(local, "ROMEO:", 20, temperature=0)
    assert done.choices[0].finish_reason in ("length", "stop")
    assert done.usage.prompt_tokens == 6 and done.usage.total_tokens == 6 + done.usage.completion_tokens
    chunks = list(
        client.completions.create(
            model=model_name, prompt="ROMEO:", max_tokens=20, temperature=0, stream=True
        )
    )
    assert "".join(c.choices[0].text for c in chunks) == done.choices[0].text
    assert chunks[-1].choices[0].finish_reason == done.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


def test_sampling_with_a_seed_is_generate_pys_too(client, model_name, local):
    settings = dict(temperature=0.9, top_p=0.9, seed=7)
    done = client.completions.create(model=model_name, prompt="JULIET:", max_tokens=15, **settings)
    expected = alone(local, "JULIET:", 15, temperature=0.9, top_p=0.9, top_k=None, seed=7)
    assert done.choices[0].text == expected


def test_a_stop_string_ends_the_text_before_it(client, model_name, local):
    free = alone(local, "To be", 20, temperature=0)
    stop = free[3:5]
    done = client.completions.create(
        model=model_name, prompt="To be", max_tokens=20, temperature=0, stop=[stop]
    )
    assert done.choices[0].text == free[: free.index(stop)] and done.choices[0].finish_reason == "stop"


def test_chat_streams_the_reply_to_the_conversation(client, model_name, local):
    messages = [{"role": "user", "content": "Who art thou?"}]
    done = client.chat.completions.create(model=model_name, messages=messages, max_tokens=12, temperature=0)
    # A model trained on text gets each message's content on a line of its own.
    assert done.choices[0].message.content == alone(local, "Who art thou?\n", 12, temperature=0)
    assert done.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(
        model=model_name, messages=messages, max_tokens=12, temperature=0, stream=True
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream)
    assert text == done.choices[0].message.content


def test_eight_clients_at_once_get_what_each_would_alone(client, model_name, local):
    cases = [
        ("ROMEO:", 20),
        ("A", 25),
        ("What light through yonder", 7),
        ("O", 30),
        ("JULIET:\nAy me", 14),
        ("Thou", 9),
        ("First Citizen:", 15),
        ("\n", 28),
    ]

    def ask(case):
        prompt, n = case
        chunks = client.completions.create(
            model=model_name, prompt=prompt, max_tokens=n, temperature=0, stream=True
        )
        return "".join(c.choices[0].text for c in chunks)

    with ThreadPoolExecutor(len(cases)) as pool:
        got = list(pool.map(ask, cases))
    assert got == [alone(local, p, n, temperature=0) for p, n in cases]


@contextlib.contextmanager
def a_long_answer(url: str, headers: dict[str, str] | None = None) -> Iterator[httpx.Response]:
    """A streamed answer of up to 2000 tokens (seconds), still running: a sampled end-of-text may
    end one early, and then the next seed is tried."""
    name = httpx.get(f"{url}/v1/models", headers=headers).json()["data"][0]["id"]
    for seed in range(5):
        body = {
            "model": name,
            "prompt": "A",
            "max_tokens": 2000,
            "temperature": 1.0,
            "seed": seed,
            "stream": True,
        }
        with httpx.stream("POST", f"{url}/v1/completions", json=body, headers=headers, timeout=30) as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            lines = r.iter_lines()  # kept: a dropped iterator closes the response
            next(lines)
            if httpx.get(f"{url}/health").json()["active"] == 1:
                yield r
                return
    raise AssertionError("5 answers of up to 2000 tokens each ended at once")


def test_a_client_that_goes_away_frees_its_row_at_once(long_run):
    """An answer of 2000 tokens takes seconds; its row is free a fraction of that after the client
    closes the connection."""
    with serving(long_run) as url:
        with a_long_answer(url):
            pass
        left = time.monotonic()
        while httpx.get(f"{url}/health").json()["active"] and time.monotonic() - left < 5:
            time.sleep(0.01)
        freed = time.monotonic() - left
        health = httpx.get(f"{url}/health").json()
        assert (health["status"], health["active"], health["queued"]) == ("ok", 0, 0)
        assert freed < 0.5, f"the row was freed {freed:.2f} s after the client left"


def test_errors_have_openais_shape_and_status(url, client, model_name):
    bad_key = openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad_key.models.list()
    assert e.value.body["code"] == "invalid_api_key"
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4", prompt="x", max_tokens=2)
    assert e.value.body == {
        "message": f"the model 'gpt-4' does not exist; this server has {model_name!r}",
        "type": "not_found_error",
        "param": "model",
        "code": "model_not_found",
    }
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=model_name, prompt="x", max_tokens=2, temperature=3)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=model_name, prompt="x" * 20, max_tokens=20)
    assert e.value.body["code"] == "context_length_exceeded" and "32 tokens" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:  # no room left at all: max_tokens is not the fix
        client.chat.completions.create(model=model_name, messages=[{"role": "user", "content": "x" * 40}])
    assert e.value.body["code"] == "context_length_exceeded" and e.value.body["param"] == "messages"
    assert e.value.body["message"] == (
        "the prompt's 41 tokens leave no room for an answer in the model's context of 32 tokens; "
        "shorten the prompt"
    )
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=model_name, messages=[{"role": "wizard", "content": "x"}])
    assert e.value.body["param"].startswith("messages")
    with pytest.raises(openai.APIStatusError) as e:
        client.completions.create(model=model_name, prompt="x" * 5000, max_tokens=2)
    assert e.value.status_code == 413 and e.value.body["code"] == "request_too_large"
    body = json.dumps({"model": model_name, "prompt": "x" * 5000, "max_tokens": 2}).encode()
    headers = {"authorization": f"Bearer {KEY}", "content-type": "application/json"}
    pieces = (body[i : i + 1000] for i in range(0, len(body), 1000))
    sent = httpx.post(f"{url}/v1/completions", content=pieces, headers=headers)  # chunked: no Content-Length
    assert "content-length" not in sent.request.headers
    assert sent.status_code == 413 and sent.json()["error"]["code"] == "request_too_large"
    message = "the request body has more than 4096 bytes; at most 4096 are taken"
    assert sent.json()["error"]["message"] == message
    nowhere = httpx.get(f"{url}/v1/nowhere")
    assert nowhere.status_code == 404 and nowhere.json()["error"]["type"] == "not_found_error"
    assert nowhere.json()["error"]["message"] == "Not Found: GET /v1/nowhere"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=model_name, prompt="x", max_tokens=2, n=2)
    assert httpx.get(f"{url}/health").json()["active"] == 0


def test_a_full_queue_answers_429_with_retry_after(long_run):
    with serving(long_run, "max_batch=1", "max_queue=0") as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
        with a_long_answer(url):  # the one row is taken
            with pytest.raises(openai.RateLimitError) as e:
                client.completions.create(model=client.models.list().data[0].id, prompt="B", max_tokens=2)
            assert e.value.response.headers["retry-after"] == "1"
            assert e.value.body["code"] == "queue_full"


def test_the_model_name_and_the_chat_template_are_the_servers_choice(long_run):
    """template=chatml writes a chat as a model fine-tuned on messages rows saw it (its prompt the
    chatml template's); model_name= is the name clients use."""
    model, tokenizer = load_model(long_run)
    prompt = format_prompt(get_template("chatml"), "Who is there?")
    expected = generate_text(model, tokenizer, prompt, 8, temperature=0)
    with serving(long_run, "template=chatml", "model_name=tiny-chat") as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["tiny-chat"]
        messages = [{"role": "user", "content": "Who is there?"}]
        done = client.chat.completions.create(
            model="tiny-chat", messages=messages, max_tokens=8, temperature=0
        )
        assert done.choices[0].message.content == expected
        assert done.usage.prompt_tokens == len(tokenizer.encode(prompt))


def test_host_is_where_it_listens_a_taken_port_is_one_line_and_ctrl_c_exits_130(served_run):
    port, host = free_port(), "127.0.0.2"  # a loopback address other than the default 127.0.0.1
    proc = start_forked(
        "serve.py", f"ckpt={served_run}", f"port={port}", f"host={host}", cwd=served_run.parent
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"http://{host}:{port}/health", timeout=1).status_code == 200:
                    break
            assert time.monotonic() < deadline
            time.sleep(0.1)
        with pytest.raises(httpx.ConnectError):  # nothing listens on the default address
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)
        taken = run_forked(
            "serve.py", f"ckpt={served_run}", f"port={port}", f"host={host}", cwd=served_run.parent
        )
        assert taken.returncode == 2, taken.stderr
        assert last_line(taken.stderr) == (
            f"error: cannot listen on {host}:{port}: Address already in use; choose another port= (or host=)"
        )
        assert "checkpoint:" not in taken.stderr  # refused before the model was loaded
    finally:
        proc.send_signal(signal.SIGINT)
    assert proc.wait(30) == 130
