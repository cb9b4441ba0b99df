"""The HTTP layer: OpenAI-compatible routes over one `Scheduler`.

    GET  /health                 liveness, active / waiting requests, KV-cache pages
    GET  /metrics                Prometheus text format (server/metrics.py)
    GET  /v1/models              the one served model
    POST /v1/completions         text (or token-id) prompt
    POST /v1/chat/completions    messages, rendered with the tokenizer's chat template

A handler validates and tokenizes its request (every problem is a 4xx before anything is
queued, so a streamed request never fails after its 200), submits a job, then either collects
the job's events into one response or forwards them as server-sent events. A client that goes
away, or a request that outlives `request_timeout`, cancels its job, which frees its batch slot.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from contextlib import asynccontextmanager
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..llm import LLM
from . import protocol as p
from .protocol import APIError
from .scheduler import Event, Job
from .service import Server, ServerConfig
from .stream import SSE_DONE, sse


def create_app(llm: LLM, config: ServerConfig) -> FastAPI:
    server = Server(llm, config)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        server.scheduler.start()
        yield
        server.scheduler.shutdown()
        server.text.close()

    app = FastAPI(title="fastdllm", lifespan=lifespan)
    app.state.server = server
    app.add_middleware(_CountInFlight, server=server)
    _add_error_handlers(app)

    @app.get("/health")
    async def health() -> Response:
        h = server.scheduler.health()
        status = "error" if not h["alive"] else "draining" if server.draining else "ok"
        body = {"status": status, "model": config.served_model_name, "max_batch": config.max_batch, **h}
        body["kv_cache"] = {k: v for k, v in h["kv_cache"].items()}
        if not h["alive"]:
            body["error"] = "the scheduler thread died; restart the server"
        return JSONResponse(body, status_code=200 if status == "ok" else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(server.metrics.render(), media_type=server.metrics.content_type)

    @app.get("/v1/models")
    async def models() -> dict:
        card = p.ModelCard(id=config.served_model_name, created=server.created, max_model_len=server.max_len)
        return p.ModelList(data=[card]).model_dump()

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        server.check_admitting()
        req = p.parse_request(await server.read_body(request), p.CompletionRequest)
        server.check_model(req.model)
        ids = await server.completion_prompt(req)
        return await _run(server, request, req, ids, _CompletionFormat(config.served_model_name))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        server.check_admitting()
        req = p.parse_request(await server.read_body(request), p.ChatCompletionRequest)
        server.check_model(req.model)
        ids = await server.chat_prompt(req)
        return await _run(server, request, req, ids, _ChatFormat(config.served_model_name))

    return app


async def drain(server: Server, timeout: float) -> None:
    """Graceful shutdown (SIGTERM): stop admitting (503), let in-flight requests finish for up
    to `timeout` seconds, then cut the rest: a streamed one gets a final error event and
    `[DONE]`, a non-streamed one a 503 body."""
    loop = asyncio.get_running_loop()
    server.draining = True
    deadline = loop.time() + timeout
    while server.in_flight and loop.time() < deadline:
        await asyncio.sleep(0.05)
    if server.in_flight:
        await asyncio.to_thread(server.scheduler.shutdown)  # every job gets a 503 event
        flushed = loop.time() + 2.0
        while server.in_flight and loop.time() < flushed:
            await asyncio.sleep(0.02)


class _CountInFlight:
    """ASGI middleware: counts API requests from arrival until their response is sent in full
    (a stream until its `[DONE]`), which is what a graceful shutdown waits for."""

    def __init__(self, app, server: Server):
        self.app, self.server = app, server

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            return await self.app(scope, receive, send)
        self.server.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.server.in_flight -= 1


async def _run(server: Server, request: Request, req, ids: list[int], fmt) -> Response:
    arrived = time.perf_counter()
    prompt_param = "messages" if isinstance(req, p.ChatCompletionRequest) else "prompt"
    params = server.decode_params(req, len(ids), prompt_param)
    stop = req.stop_strings()
    deadline = server.deadline()
    job = server.scheduler.submit(ids, params, stop)
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return StreamingResponse(_stream(server, job, deadline, fmt, len(ids), include_usage, arrived),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    watcher = asyncio.create_task(server.cancel_on_disconnect(request, job))
    parts = []
    try:
        while True:
            event = await server.next_event(job, deadline)
            if event.error is not None:
                raise event.error
            if event.text and not parts:
                server.metrics.ttft.observe(time.perf_counter() - arrived)
            parts.append(event.text)
            if event.finish_reason is not None:
                break
    finally:
        watcher.cancel()
        if not job.done:
            server.scheduler.cancel(job)
    server.metrics.latency.observe(time.perf_counter() - arrived)
    usage = _usage(len(ids), event.completion_tokens, event.cached_tokens)
    return JSONResponse(fmt.response("".join(parts), event.finish_reason, usage))


async def _stream(server: Server, job: Job, deadline: float | None, fmt, prompt_tokens: int,
                  include_usage: bool, arrived: float) -> AsyncIterator[str]:
    """SSE body. Starlette cancels this generator when the client disconnects; `finally`
    then cancels the job."""
    first = True
    try:
        for chunk in fmt.opening():
            yield sse(chunk)
        while True:
            try:
                event = await server.next_event(job, deadline)
            except APIError as e:  # timed out
                event = Event(error=e)
            if event.error is not None:
                yield sse(event.error.body())
                break
            if event.text:
                if first:
                    server.metrics.ttft.observe(time.perf_counter() - arrived)
                    first = False
                yield sse(fmt.chunk(event.text, None))
            if event.finish_reason is not None:
                server.metrics.latency.observe(time.perf_counter() - arrived)
                yield sse(fmt.chunk("", event.finish_reason))
                if include_usage:
                    yield sse(fmt.usage_chunk(_usage(prompt_tokens, event.completion_tokens,
                                                     event.cached_tokens)))
                break
        yield SSE_DONE
    finally:
        if not job.done:
            server.scheduler.cancel(job)


def _usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> p.Usage:
    return p.Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens,
                   prompt_tokens_details=p.PromptTokensDetails(cached_tokens=cached_tokens))


class _CompletionFormat:
    """Response and chunk bodies of /v1/completions."""

    def __init__(self, model: str):
        self.id, self.model, self.created = f"cmpl-{uuid.uuid4().hex}", model, int(time.time())

    def _body(self, choices, usage=None) -> dict:
        return p.CompletionResponse(id=self.id, created=self.created, model=self.model,
                                    choices=choices, usage=usage).model_dump()

    def response(self, text: str, finish_reason: str, usage: p.Usage) -> dict:
        return self._body([p.CompletionChoice(text=text, finish_reason=finish_reason)], usage)

    def opening(self) -> list[dict]:
        return []

    def chunk(self, text: str, finish_reason: str | None) -> dict:
        return self._body([p.CompletionChoice(text=text, finish_reason=finish_reason)])

    def usage_chunk(self, usage: p.Usage) -> dict:
        return self._body([], usage)


class _ChatFormat:
    """Response and chunk bodies of /v1/chat/completions."""

    def __init__(self, model: str):
        self.id, self.model, self.created = f"chatcmpl-{uuid.uuid4().hex}", model, int(time.time())

    def response(self, text: str, finish_reason: str, usage: p.Usage) -> dict:
        choice = p.ChatChoice(message=p.AssistantMessage(content=text), finish_reason=finish_reason)
        return p.ChatCompletionResponse(id=self.id, created=self.created, model=self.model,
                                        choices=[choice], usage=usage).model_dump()

    def _chunk(self, choices, usage=None) -> dict:
        return p.ChatCompletionChunk(id=self.id, created=self.created, model=self.model,
                                     choices=choices, usage=usage).model_dump()

    def opening(self) -> list[dict]:
        return [self._chunk([p.ChatChunkChoice(delta=p.ChatDelta(role="assistant", content=""))])]

    def chunk(self, text: str, finish_reason: str | None) -> dict:
        delta = p.ChatDelta(content=text) if text else p.ChatDelta()
        return self._chunk([p.ChatChunkChoice(delta=delta, finish_reason=finish_reason)])

    def usage_chunk(self, usage: p.Usage) -> dict:
        return self._chunk([], usage)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        kind = "invalid_request_error" if e.status_code < 500 else "server_error"
        return JSONResponse(APIError(str(e.detail), status=e.status_code, type=kind).body(),
                            status_code=e.status_code, headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception) -> JSONResponse:
        return JSONResponse(APIError(f"internal error: {type(e).__name__}", status=500,
                                     type="server_error").body(), status_code=500)
