"""The HTTP layer: OpenAI-compatible routes over one `Scheduler`.

    GET  /health                 liveness, active / waiting requests, KV-cache pages
    GET  /metrics                Prometheus text format (server/metrics.py)
    GET  /v1/models              the one served model
    GET  /v1/models/{id}         its card (404 model_not_found for any other name)
    POST /v1/completions         text (or token-id) prompt
    POST /v1/chat/completions    messages, rendered with the tokenizer's chat template

A handler validates and tokenizes its request (every problem is a 4xx before anything is
queued, so a streamed request never fails after its 200), then `respond.run` submits a job per
choice and either collects the jobs' events into one response or forwards them as server-sent
events. A client that goes away, or a request that outlives `request_timeout`, cancels its
jobs, which frees their batch slots.
"""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..llm import LLM
from . import protocol as p
from .protocol import APIError
from .limits import allowed_hosts, host_name
from .respond import ChatFormat, CompletionFormat, run
from .service import Server, ServerConfig


def create_app(llm: LLM, config: ServerConfig, *, host: str = "127.0.0.1") -> FastAPI:
    """The app for a server bound to `host` (which picks the Host names it answers by default)."""
    server = Server(llm, config)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        server.scheduler.start()
        yield
        server.scheduler.shutdown()
        server.close()

    app = FastAPI(title="fastdllm", lifespan=lifespan)
    app.state.server = server
    app.add_middleware(_CountInFlight, server=server)
    if config.allowed_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(config.allowed_origins),
                           allow_methods=["GET", "POST"], allow_headers=["*"])
    app.add_middleware(_OriginPolicy, allowed=config.allowed_origins)
    app.add_middleware(_HostPolicy, allowed=allowed_hosts(host, config.allowed_hosts))
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

    def card() -> p.ModelCard:
        return p.ModelCard(id=config.served_model_name, created=server.created, max_model_len=server.max_len)

    @app.get("/v1/models")
    async def models() -> dict:
        return p.ModelList(data=[card()]).model_dump()

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict:
        server.check_model(model_id)
        return card().model_dump()

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        server.check_admitting()
        req = await server.read_request(request, p.CompletionRequest)
        server.check_request(req)
        prompts = await server.completion_prompts(req)
        return await run(server, request, req, prompts, CompletionFormat(config.served_model_name))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        server.check_admitting()
        req = await server.read_request(request, p.ChatCompletionRequest)
        server.check_request(req)
        ids = await server.chat_prompt(req)
        return await run(server, request, req, [ids], ChatFormat(config.served_model_name))

    return app


async def drain(server: Server, timeout: float) -> None:
    """Graceful shutdown (SIGTERM): stop admitting (503), let in-flight requests finish for up
    to `timeout` seconds, then cut the rest: a streamed one gets a final error event and
    `[DONE]`, a non-streamed one a 503 body."""
    loop = asyncio.get_running_loop()
    server.draining = True
    deadline = server.drain_deadline = loop.time() + timeout  # request bodies still uploading too
    while server.in_flight and loop.time() < deadline:
        await asyncio.sleep(0.05)
    if server.in_flight:
        await asyncio.to_thread(server.scheduler.shutdown)  # every job gets a 503 event
        flushed = loop.time() + 2.0
        while server.in_flight and loop.time() < flushed:
            await asyncio.sleep(0.02)


class _OriginPolicy:
    """ASGI middleware: a request from a web page (it carries an `Origin` header) is refused
    with 403 unless its origin is allowed (`--allowed-origins`; none by default). CORS headers
    alone would not do: a browser sends a simple POST and only hides the answer from the page."""

    def __init__(self, app, allowed: tuple[str, ...]):
        self.app, self.allowed = app, allowed

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            origin = dict(scope["headers"]).get(b"origin")
            if origin is not None and "*" not in self.allowed and \
                    origin.decode("latin-1") not in self.allowed:
                error = APIError("requests from web pages are refused: this server allows no "
                                 f"origin {p._shorten(origin.decode('latin-1'))!r}; start it with "
                                 "--allowed-origins to allow one", status=403, code="origin_not_allowed")
                return await JSONResponse(error.body(), status_code=403)(scope, receive, send)
        return await self.app(scope, receive, send)


class _HostPolicy:
    """ASGI middleware: a request whose Host header names a host this server does not answer to
    gets 403 (DNS rebinding: a web page whose own name now resolves to 127.0.0.1 sends that
    name; `--allowed-hosts`, by default the loopback names when bound to loopback)."""

    def __init__(self, app, allowed: tuple[str, ...]):
        self.app, self.allowed = app, tuple(h.lower() for h in allowed)

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and "*" not in self.allowed:
            header = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
            if host_name(header).lower() not in self.allowed:
                error = APIError(f"this server does not answer to the host {p._shorten(header or 'none')!r} "
                                 f"(it answers to {', '.join(self.allowed)}); start it with "
                                 "--allowed-hosts to add one", status=403, code="host_not_allowed")
                return await JSONResponse(error.body(), status_code=403)(scope, receive, send)
        return await self.app(scope, receive, send)


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


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        kind = "invalid_request_error" if e.status_code < 500 else "server_error"
        return JSONResponse(APIError(str(e.detail), status=e.status_code, type=kind).body(),
                            status_code=e.status_code, headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception) -> JSONResponse:
        return JSONResponse(APIError(f"internal error: {type(e).__name__}", status=500,
                                     type="server_error").body(), status_code=500)
