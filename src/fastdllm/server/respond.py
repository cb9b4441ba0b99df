"""From a prepared request to its answer: one job per choice (each prompt x `n`), collected into
one response body or forwarded as server-sent events.

Every choice's DecodeConfig is built (and so every 4xx raised) before the first job is
submitted, so a streamed request never fails after its 200 for something it sent. Choice `i`
of prompt `j` has index `j * n + i`, as in OpenAI's answers. A client that goes away, or a
request that outlives `request_timeout`, cancels all its jobs.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ..engine.params import DecodeConfig
from . import openai_fields as lp
from . import protocol as p
from .protocol import APIError
from .scheduler import Event, Job
from .service import CLIENT_GONE, Server, echo_only, logprob_count
from .stream import SSE_DONE, sse


@dataclass
class Choice:
    index: int
    ids: list[int]  # the prompt's
    params: DecodeConfig
    decode: bool  # False: echo only (max_tokens 0)
    echo: list[lp.TokenInfo] | None = None  # the echoed prompt's tokens (with logprobs if asked)
    job: Job | None = None
    text: list[str] = field(default_factory=list)
    tokens: int = 0
    finish_reason: str | None = None
    prompt: int = 0  # which of the request's prompts
    cached: int = 0  # its prompt tokens served by the prefix cache
    arrived: float = 0.0  # perf_counter at the request's arrival (metrics)
    started: bool = False  # its first text was sent (time to first token observed)

    def observe(self, server: Server, event: Event) -> None:
        """Time to first token and request latency (server/metrics.py), and the cached count."""
        now = time.perf_counter()
        if event.text and not self.started:
            self.started = True
            server.metrics.ttft.observe(now - self.arrived)
        if event.finish_reason is not None:
            self.cached = event.cached_tokens
            server.metrics.latency.observe(now - self.arrived)


async def run(server: Server, request: Request, req, prompts: list[list[int]], fmt) -> Response:
    arrived = time.perf_counter()
    chat = isinstance(req, p.ChatCompletionRequest)
    prompt_param = "messages" if chat else "prompt"
    stop = req.stop_strings()
    choices = [Choice(j * req.n + i, ids, server.decode_params(req, len(ids), prompt_param, i),
                      not echo_only(req), prompt=j, arrived=arrived)
               for j, ids in enumerate(prompts) for i in range(req.n)]
    k = logprob_count(req)
    if not chat and req.echo:
        await _echo(server, choices, k)
    deadline = server.deadline()
    for c in choices:
        if c.decode:
            c.job = server.scheduler.submit(c.ids, c.params, stop)
    prompt_tokens = sum(len(ids) for ids in prompts)
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return StreamingResponse(_stream(server, choices, deadline, fmt, k, prompt_tokens, include_usage),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    tasks = [asyncio.create_task(_cancel_on_disconnect(server, request, choices))]
    try:
        collecting = [asyncio.create_task(_collect(server, c, deadline)) for c in choices if c.job]
        tasks += collecting
        await asyncio.gather(*collecting)
    finally:
        for t in tasks:
            t.cancel()
        _cancel(server, choices)
    bodies = []
    for c in choices:
        logprobs = None
        if k is not None:
            infos = (c.echo or []) + (lp.generated(c.job.seq, len(c.ids), len(c.ids) + c.tokens)
                                      if c.job else [])
            logprobs = await _format_logprobs(server, fmt, infos, k)
        echoed = "" if c.echo is None else await _prompt_text(server, c.ids)
        bodies.append((c.index, echoed + "".join(c.text), c.finish_reason or "length", logprobs))
    usage = _usage(prompt_tokens, sum(c.tokens for c in choices), _cached(choices))
    return JSONResponse(fmt.response(bodies, usage))


async def _echo(server: Server, choices: list[Choice], k: int | None) -> None:
    """The echoed prompts' tokens, scored once per distinct prompt when logprobs are asked."""
    scored: dict[tuple, list[lp.TokenInfo]] = {}
    for c in choices:
        key = tuple(c.ids)
        if key not in scored:
            if k is None:
                scored[key] = [lp.TokenInfo(i, None, ()) for i in c.ids]
            else:
                scores = await server.score_prompt(c.ids, c.params, k)
                scored[key] = lp.prompt(c.ids, scores)
        c.echo = scored[key]
        if not c.decode:
            c.finish_reason = "length"


async def _collect(server: Server, c: Choice, deadline: float | None) -> None:
    while True:
        event = await server.next_event(c.job, deadline)
        if event.error is not None:
            raise event.error
        c.observe(server, event)
        c.text.append(event.text)
        c.tokens = event.completion_tokens
        if event.finish_reason is not None:
            c.finish_reason = event.finish_reason
            return


async def _format_logprobs(server: Server, fmt, infos: list[lp.TokenInfo], k: int):
    ids = lp.ids_to_spell(infos)
    spelled, raw = await server.text.run(
        lambda tok: ([tok.decode([i]) for i in ids], lp.token_bytes(tok, ids)),
        server.config.text_timeout, "logprobs")
    return fmt.logprobs(infos, dict(zip(ids, spelled)), dict(zip(ids, raw)), k)


async def _prompt_text(server: Server, ids: list[int]) -> str:
    return await server.text.run(lambda tok: tok.decode(ids, skip_special_tokens=True),
                                 server.config.text_timeout, "prompt")


async def _cancel_on_disconnect(server: Server, request: Request, choices: list[Choice]) -> None:
    """Beside a non-streamed request: when its client hangs up, cancel its jobs (freeing their
    slots now) and wake its handler."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    for c in choices:
        if c.job is not None:
            server.scheduler.cancel(c.job)
            c.job.events.put_nowait(Event(error=CLIENT_GONE))


def _cancel(server: Server, choices: list[Choice]) -> None:
    for c in choices:
        if c.job is not None and not c.job.done:
            server.scheduler.cancel(c.job)


async def _stream(server: Server, choices: list[Choice], deadline: float | None, fmt, k: int | None,
                  prompt_tokens: int, include_usage: bool) -> AsyncIterator[str]:
    """SSE body: every choice's events as they come, tagged with its index. Starlette cancels
    this generator when the client disconnects; `finally` then cancels the jobs."""
    merged: asyncio.Queue[tuple[Choice, Event]] = asyncio.Queue()

    async def forward(c: Choice) -> None:
        while True:
            try:
                event = await server.next_event(c.job, deadline)
            except APIError as e:  # timed out
                event = Event(error=e)
            merged.put_nowait((c, event))
            if event.error is not None or event.finish_reason is not None:
                return

    tasks = [asyncio.create_task(forward(c)) for c in choices if c.job is not None]
    try:
        for c in choices:
            for chunk in fmt.opening(c.index):
                yield sse(chunk)
            if c.echo is not None:
                logprobs = None if k is None else await _format_logprobs(server, fmt, c.echo, k)
                yield sse(fmt.chunk(c.index, await _prompt_text(server, c.ids), c.finish_reason, logprobs))
        running = len(tasks)
        while running:
            c, event = await merged.get()
            if event.error is not None:
                yield sse(event.error.body())
                break
            c.observe(server, event)
            c.tokens = event.completion_tokens
            start, end = event.span
            if event.text or (k is not None and end > start):
                logprobs = None
                if k is not None:
                    logprobs = await _format_logprobs(server, fmt, lp.generated(c.job.seq, start, end), k)
                yield sse(fmt.chunk(c.index, event.text, None, logprobs))
            if event.finish_reason is not None:
                running -= 1
                yield sse(fmt.chunk(c.index, "", event.finish_reason, None))
        else:
            if include_usage:
                yield sse(fmt.usage_chunk(_usage(prompt_tokens, sum(c.tokens for c in choices),
                                                 _cached(choices))))
        yield SSE_DONE
    finally:
        for t in tasks:
            t.cancel()
        _cancel(server, choices)


def _usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> p.Usage:
    return p.Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens,
                   prompt_tokens_details=p.PromptTokensDetails(cached_tokens=cached_tokens))


def _cached(choices: list[Choice]) -> int:
    """Prompt tokens served by the prefix cache, per prompt (its choices share one prompt)."""
    best: dict[int, int] = {}
    for c in choices:
        best[c.prompt] = max(best.get(c.prompt, 0), c.cached)
    return sum(best.values())


class CompletionFormat:
    """Response and chunk bodies of /v1/completions."""

    def __init__(self, model: str):
        self.id, self.model, self.created = f"cmpl-{uuid.uuid4().hex}", model, int(time.time())

    def _body(self, choices, usage=None) -> dict:
        return p.CompletionResponse(id=self.id, created=self.created, model=self.model,
                                    choices=choices, usage=usage).model_dump()

    def response(self, bodies, usage: p.Usage) -> dict:
        return self._body([p.CompletionChoice(index=i, text=text, finish_reason=reason, logprobs=logprobs)
                           for i, text, reason, logprobs in bodies], usage)

    def logprobs(self, infos, spell, raw, k: int) -> p.CompletionLogprobs:
        return lp.completion_logprobs(infos, spell, k)

    def opening(self, index: int) -> list[dict]:
        return []

    def chunk(self, index: int, text: str, finish_reason: str | None, logprobs) -> dict:
        return self._body([p.CompletionChoice(index=index, text=text, finish_reason=finish_reason,
                                              logprobs=logprobs)])

    def usage_chunk(self, usage: p.Usage) -> dict:
        return self._body([], usage)


class ChatFormat:
    """Response and chunk bodies of /v1/chat/completions."""

    def __init__(self, model: str):
        self.id, self.model, self.created = f"chatcmpl-{uuid.uuid4().hex}", model, int(time.time())

    def response(self, bodies, usage: p.Usage) -> dict:
        choices = [p.ChatChoice(index=i, message=p.AssistantMessage(content=text),
                                finish_reason=reason, logprobs=logprobs)
                   for i, text, reason, logprobs in bodies]
        return p.ChatCompletionResponse(id=self.id, created=self.created, model=self.model,
                                        choices=choices, usage=usage).model_dump()

    def logprobs(self, infos, spell, raw, k: int) -> p.ChatLogprobs:
        return lp.chat_logprobs(infos, spell, raw, k)

    def _chunk(self, choices, usage=None) -> dict:
        return p.ChatCompletionChunk(id=self.id, created=self.created, model=self.model,
                                     choices=choices, usage=usage).model_dump()

    def opening(self, index: int) -> list[dict]:
        return [self._chunk([p.ChatChunkChoice(index=index, delta=p.ChatDelta(role="assistant", content=""))])]

    def chunk(self, index: int, text: str, finish_reason: str | None, logprobs) -> dict:
        delta = p.ChatDelta(content=text) if text else p.ChatDelta()
        return self._chunk([p.ChatChunkChoice(index=index, delta=delta, finish_reason=finish_reason,
                                              logprobs=logprobs)])

    def usage_chunk(self, usage: p.Usage) -> dict:
        return self._chunk([], usage)
