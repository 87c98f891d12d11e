"""The OpenAI API subset that clients use, on FastAPI, over the continuous-batching engine.

GET /v1/models, POST /v1/completions, POST /v1/chat/completions (streamed as server-sent events:
`data: {chunk}` lines, then `data: [DONE]`), GET /health, and the chat page at /. Errors have
OpenAI's shape, {"error": {"message", "type", "param", "code"}}, and status: 400 bad request, 401
bad key, 404 unknown model (or path), 413 body too large, 429 queue full (with Retry-After).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator
from importlib import resources
from typing import Any, Literal

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.sse import EventSourceResponse, format_sse_event
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.types import Message as AsgiMessage

from gpt.config import SamplingConfig
from gpt.data.pairs import Example, chat_segments, encode_example, merge_segments
from gpt.errors import UserError
from gpt.generate.text import encode_prompts
from gpt.serve.engine import Engine, QueueFull
from gpt.serve.engine import Request as EngineRequest
from gpt.templates import Template
from gpt.tokenizer import Tokenizer

ENGINE_FAILED = "generation failed on the server (its log has the traceback); try again"
PAGE = "chat.html"  # beside this module, shipped as package data


class ApiError(Exception):
    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None, **headers
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    def response(self) -> JSONResponse:
        kind = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error"}
        body = {"message": self.message, "type": kind.get(self.status, "invalid_request_error")}
        body |= {"param": self.param, "code": self.code}
        return JSONResponse({"error": body}, status_code=self.status, headers=self.headers)


class BodyTooLarge(HTTPException):
    def __init__(self, max_bytes: int, size: str | None = None) -> None:
        sent = size or f"more than {max_bytes}"
        super().__init__(413, f"the request body has {sent} bytes; at most {max_bytes} are taken")


class BodyLimit:
    """At most `max_bytes` of request body: a Content-Length over it is refused before the body is
    read, and a body sent without one (chunked) as soon as it has sent more, with OpenAI's 413.

    Pure ASGI, as Starlette advises for middleware in front of streamed responses. FastAPI's own
    max_body_size would answer in its {"detail": ...} shape, from outside the app's handlers."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        size = dict(scope["headers"]).get(b"content-length", b"").decode("latin-1")
        if size.isdigit() and int(size) > self.max_bytes:
            await openai_error(BodyTooLarge(self.max_bytes, size)).response()(scope, receive, send)
            return
        read = 0

        async def receive_at_most() -> AsgiMessage:
            nonlocal read
            message = await receive()
            read += len(message.get("body", b""))
            if read > self.max_bytes:  # raised inside the app: its handler answers
                raise BodyTooLarge(self.max_bytes)
            return message

        await self.app(scope, receive_at_most, send)


def openai_error(e: HTTPException, request: Request | None = None) -> ApiError:
    """One of Starlette's errors (an unknown path, a method not allowed, a body too large) as
    OpenAI's, naming the request's method and path where it is about them."""
    code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(e.status_code)
    message = str(e.detail)
    if request is not None and e.status_code in (404, 405):
        message += f": {request.method} {request.url.path}"
    return ApiError(e.status_code, message, code=code, **(e.headers or {}))


class Sampling(BaseModel):
    """The fields both endpoints take (OpenAI's defaults: temperature 1, top_p 1)."""

    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=1)  # an extension
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    n: int = Field(default=1, ge=1, le=1)


class CompletionBody(Sampling):
    prompt: str | list[str]


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatBody(Sampling):
    messages: list[Message] = Field(min_length=1)


def stops(body: Sampling) -> list[str]:
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > 4 or not all(stop):
        raise ApiError(400, "stop takes up to 4 non-empty strings", "stop")
    return stop


def chat_ids(template: Template | None, messages: list[Message], tokenizer: Tokenizer) -> list[int]:
    """A conversation as the model saw chats in training (gpt.data.pairs: each turn through the
    checkpoint's template, each assistant turn followed by end-of-text), then the assistant's reply
    prefix. A model trained on text (no template) gets each message's content on a line of its own."""
    if template is None:
        return tokenizer.encode("".join(m.content + "\n" for m in messages))
    turns = [m.model_dump() for m in messages]
    segments = chat_segments(turns, {"role": "role", "content": "content"}, template, "messages", whole=False)
    example = Example(merge_segments([*segments, (template.reply, False)]), "messages")
    return encode_example(example, tokenizer)[0].tolist()


def create_app(
    engine: Engine, model_name: str, template: Template | None, api_key: str | None, max_body_bytes: int
) -> FastAPI:
    app = FastAPI(title="gpt serve", docs_url=None, redoc_url=None)
    tokenizer, block = engine.tokenizer, engine.block
    # Pieces the engine's thread handed over, for each event loop: one wake-up of the loop for all the
    # rows of a step, not one each (waking it writes to a pipe: 5% of the engine's time at 16 rows).
    handed: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, tuple]]] = {}
    handed_lock = threading.Lock()

    def hand_over(loop: asyncio.AbstractEventLoop, pieces: asyncio.Queue, piece: tuple) -> None:
        with handed_lock:
            waiting = handed.setdefault(loop, [])
            waiting.append((pieces, piece))
            wake = len(waiting) == 1  # the loop takes the ones that come before it runs
        if wake:
            loop.call_soon_threadsafe(take_handed, loop)

    def take_handed(loop: asyncio.AbstractEventLoop) -> None:
        with handed_lock:
            batch = handed.pop(loop, [])
        for pieces, piece in batch:
            pieces.put_nowait(piece)

    @app.exception_handler(ApiError)
    async def api_error(_: Request, e: ApiError) -> JSONResponse:
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def bad_request(_: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0]
        param = ".".join(str(p) for p in first["loc"] if p != "body") or None
        return ApiError(400, f"{param or 'body'}: {first['msg']}", param).response()

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        return openai_error(e, request).response()

    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)

    async def check_key(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), api_key.encode()):
            raise ApiError(
                401, "invalid API key: send Authorization: Bearer <api_key>", code="invalid_api_key"
            )

    def check_model(body: Sampling) -> None:
        if body.model != model_name:
            raise ApiError(
                404,
                f"the model {body.model!r} does not exist; this server has {model_name!r}",
                "model",
                "model_not_found",
            )

    def encode(text: str) -> list[int]:
        try:
            return encode_prompts(tokenizer, [text])[0]  # refuses a prompt of no tokens
        except UserError as e:
            raise ApiError(400, str(e), "prompt") from None

    def start(
        kind: str, body: Sampling, ids: list[int], default_max: int
    ) -> tuple[EngineRequest, asyncio.Queue]:
        max_tokens = body.max_tokens or default_max
        if len(ids) >= block:
            raise ApiError(
                400,
                f"the prompt's {len(ids)} tokens leave no room for an answer in the model's context of "
                f"{block} tokens; shorten the prompt",
                "messages" if kind == "chat" else "prompt",
                "context_length_exceeded",
            )
        if len(ids) + max_tokens > block:
            raise ApiError(
                400,
                f"the prompt's {len(ids)} tokens and max_tokens={max_tokens} exceed the model's context of "
                f"{block} tokens; shorten the prompt or lower max_tokens",
                "max_tokens",
                "context_length_exceeded",
            )
        loop, pieces = asyncio.get_running_loop(), asyncio.Queue()
        sampling = SamplingConfig(temperature=body.temperature, top_k=body.top_k, top_p=body.top_p)
        request = EngineRequest(
            ids,
            max_tokens,
            lambda *piece: hand_over(loop, pieces, piece),
            sampling,
            body.seed,
            stops(body),
        )
        try:
            engine.submit(request)
        except QueueFull as e:
            raise ApiError(
                429, f"the server is busy ({e}); try again shortly", code="queue_full", **{"Retry-After": "1"}
            ) from None
        return request, pieces

    async def answer(kind: str, body: Sampling, ids: list[int], default_max: int):
        request, pieces = start(kind, body, ids, default_max)
        name = "chat.completion" if kind == "chat" else "text_completion"
        common = {
            "id": f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}",
            "created": int(time.time()),
            "model": model_name,
        }

        def choice(text: str, finish: str | None, delta: bool) -> dict[str, Any]:
            if kind == "chat":
                key = "delta" if delta else "message"
                content = {"content": text} if text or not delta else {}
                return {"index": 0, key: ({"role": "assistant"} | content), "finish_reason": finish}
            return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}

        def usage() -> dict[str, int]:
            done = request.completion_tokens
            return {"prompt_tokens": len(ids), "completion_tokens": done, "total_tokens": len(ids) + done}

        if not body.stream:
            text, finish = "", None
            try:
                while finish is None:
                    piece, finish = await pieces.get()
                    text += piece
            finally:
                request.cancel()
            if finish == "error":
                raise ApiError(500, ENGINE_FAILED, code="engine_error")
            return {"object": name, **common, "choices": [choice(text, finish, False)], "usage": usage()}

        async def events() -> AsyncIterator[bytes]:
            try:
                finish = None
                while finish is None:
                    piece, finish = await pieces.get()
                    if finish == "error":  # the status is sent already: OpenAI's error event
                        error = ApiError(500, ENGINE_FAILED, code="engine_error").response().body
                        yield format_sse_event(data_str=error.decode())
                    elif piece or finish:
                        chunk = {
                            "object": f"{name}.chunk" if kind == "chat" else name,
                            **common,
                            "choices": [choice(piece, finish, True)],
                        }
                        if finish:
                            chunk["usage"] = usage()
                        yield format_sse_event(data_str=json.dumps(chunk))
                yield format_sse_event(data_str="[DONE]")
            finally:
                request.cancel()  # a client that went away frees its row at the next step

        return EventSourceResponse(events())

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "active": engine.active, "queued": engine.queued, "pid": os.getpid()}

    page_html = resources.files("gpt.serve").joinpath(PAGE).read_text(encoding="utf-8")

    @app.get("/")
    async def page() -> HTMLResponse:
        return HTMLResponse(page_html)

    @app.get("/v1/models", dependencies=[Depends(check_key)])
    async def models() -> dict[str, Any]:
        entry = {"id": model_name, "object": "model", "created": 0, "owned_by": "gpt"}
        return {"object": "list", "data": [entry]}

    @app.post("/v1/completions", dependencies=[Depends(check_key)])
    async def completions(body: CompletionBody):
        check_model(body)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if len(prompts) != 1:
            raise ApiError(400, "give one prompt per request", "prompt")
        return await answer("text", body, encode(prompts[0]), default_max=16)

    @app.post("/v1/chat/completions", dependencies=[Depends(check_key)])
    async def chat(body: ChatBody):
        check_model(body)
        try:
            ids = chat_ids(template, body.messages, tokenizer)
        except UserError as e:
            raise ApiError(400, str(e), "messages") from None
        return await answer("chat", body, ids, default_max=max(block - len(ids), 1))

    return app
