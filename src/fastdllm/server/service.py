"""What the routes stand on: the served model, its scheduler, and turning an OpenAI request into
prompt ids and a `DecodeConfig`.

Every check happens here, before a job is queued, so that each problem is a 4xx naming its
field, and a streamed request never fails after its 200 has been sent. Decoding parameters are
validated by `DecodeConfig` itself; what is left to check is what only the server knows: its
context (`max_model_len`), its engine's positions, and the served model's name.
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from fastapi import Request

from ..chat_template import TemplateLimits
from ..engine.merged import MAX_MERGED_DRAFT
from ..engine.params import MAX_BLOCK_SIZE, DecodeConfig
from ..engine.speculative import SpeculativeEngine
from ..errors import FastDLLMError
from ..evaluation.loglikelihood import Scores, continuation_scores
from ..llm import LLM
from ..model.checkpoint import load_tokenizer
from . import protocol as p
from .protocol import APIError
from .metrics import Metrics
from .scheduler import Event, Job, Scheduler, shutting_down


@dataclass(frozen=True)
class ServerConfig:
    served_model_name: str
    defaults: DecodeConfig  # decoding defaults: the checkpoint's, then the server's flags
    max_batch: int = 8  # sequences decoded together (engine slots)
    request_timeout: float | None = 600.0  # seconds from arrival to the last token; None = none
    max_model_len: int | None = None  # positions per sequence; None = the model's context
    # limits on untrusted input, checked on the raw request before any tokenizing
    max_body_bytes: int = 4 << 20
    max_prompt_chars: int | None = None  # None: PROMPT_CHARS_PER_POSITION x max_model_len
    text_timeout: float = 5.0  # seconds to render the chat template and tokenize one request
    drain_timeout: float = 30.0  # on SIGTERM: seconds in-flight requests may take to finish
    # per-request decoding shapes, bounded so that one request cannot slow its batch peers
    # (a step is as slow as its widest row): None = the defaults' own value, at least 64 / 16
    max_block_size: int | None = None
    max_draft_length: int | None = None
    # positions one request's row may put into each forward (DecodeConfig.step_positions);
    # None: the defaults' own, at least 64
    max_step_tokens: int | None = None
    # browser origins allowed to call the server (CORS); none by default, so no web page can
    # drive a local server. "*" allows any.
    allowed_origins: tuple[str, ...] = ()
    # Host names answered (DNS rebinding); None: the loopback names when bound to loopback,
    # else any (limits.allowed_hosts). "*" allows any.
    allowed_hosts: tuple[str, ...] | None = None
    # slow clients (limits.py): seconds for a request's headers, for its whole body, and an
    # idle kept-alive connection's life; connections + requests at once (uvicorn's cap, over it
    # a 503), None: the file-descriptor limit less 64
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    keep_alive_timeout: float = 5.0
    limit_concurrency: int | None = None

    def __post_init__(self):
        if self.max_batch < 1:
            raise FastDLLMError(f"max_batch must be >= 1, got {self.max_batch}", field="max_batch",
                                fixes=[("max_batch", 1)])
        if self.request_timeout is not None and self.request_timeout <= 0:
            raise FastDLLMError(f"request_timeout must be > 0 seconds, got {self.request_timeout}",
                                field="request_timeout")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise FastDLLMError(f"max_model_len must be >= 2, got {self.max_model_len}",
                                field="max_model_len")
        if self.max_body_bytes < 1024:
            raise FastDLLMError(f"max_body_bytes must be >= 1024, got {self.max_body_bytes}",
                                field="max_body_bytes")
        if self.max_prompt_chars is not None and self.max_prompt_chars < 1:
            raise FastDLLMError(f"max_prompt_chars must be >= 1, got {self.max_prompt_chars}",
                                field="max_prompt_chars")
        if not 0 < self.text_timeout <= 3600:
            raise FastDLLMError(f"text_timeout must be in (0, 3600] seconds, got {self.text_timeout}",
                                field="text_timeout")
        for name in ("max_block_size", "max_draft_length", "max_step_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise FastDLLMError(f"{name} must be >= 1, got {value}", field=name)
        for name in ("header_timeout", "body_timeout", "keep_alive_timeout"):
            if not 0 < getattr(self, name) <= 3600:
                raise FastDLLMError(f"{name} must be in (0, 3600] seconds, got {getattr(self, name)}",
                                    field=name)
        if self.limit_concurrency is not None and self.limit_concurrency < 2:
            raise FastDLLMError(f"limit_concurrency must be >= 2, got {self.limit_concurrency}",
                                field="limit_concurrency")
        if not 0 <= self.drain_timeout <= 86400:
            raise FastDLLMError(f"drain_timeout must be in [0, 86400] seconds, got "
                                f"{self.drain_timeout}", field="drain_timeout")


# No tokenizer packs more than a few characters into a token on average (English BPE: ~4), so a
# prompt of more than 64 characters per position of the context could never fit.
PROMPT_CHARS_PER_POSITION = 64


class Server:
    """The state behind the routes: the model, its scheduler, and request preparation."""

    def __init__(self, llm: LLM, config: ServerConfig):
        if llm.tokenizer is None:
            raise FastDLLMError(f"{llm.model_dir} has no tokenizer files; the server needs one to "
                                "turn tokens into text", field="model")
        if config.max_model_len is not None and config.max_model_len > llm.context_length:
            raise FastDLLMError(f"max_model_len {config.max_model_len} exceeds the model's context "
                                f"of {llm.context_length}", field="max_model_len",
                                fixes=[("max_model_len", llm.context_length)])
        self.llm = llm
        self.config = config
        self.max_len = config.max_model_len or llm.context_length
        # the KV cache is a pool of pages sized by the memory budget (LLM.load's
        # kv_cache_memory), shared by every request as it grows; a server that decodes speculatively by default runs the speculative engine, which
        # also serves mode "ar" (the per-request opt-out)
        engine = llm.new_engine(config.max_batch, self.max_len, config.defaults.block_size,
                                context=self.max_len, speculative=config.defaults.speculative)
        self.positions = engine.max_len
        self.speculative = isinstance(engine, SpeculativeEngine)
        # the most positions one request may hold: the whole pool (less the merged form's scratch)
        usage = engine.usage()
        self.pool_positions = usage["pages_total"] * usage["page_size"]
        # the scheduler thread decodes with its own tokenizer, so the event loop's encoding
        # never shares one (fast tokenizers refuse concurrent use from two threads)
        detok = load_tokenizer(llm.model_dir)
        self.scheduler = Scheduler(engine, lambda ids: detok.decode(ids, skip_special_tokens=True))
        self.metrics = Metrics(self.scheduler)
        self.text = TextWorkers(llm.model_dir)
        # request bodies are parsed here, off the event loop; one thread: parsing is CPU-bound
        # (the GIL), so more threads would only take turns
        self._parsing = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fastdllm-parse")
        self.max_prompt_chars = config.max_prompt_chars or PROMPT_CHARS_PER_POSITION * self.max_len
        # the template's output is a prompt too, plus its markup
        self.template_limits = TemplateLimits(seconds=config.text_timeout,
                                              max_output_chars=2 * self.max_prompt_chars + 65536)
        d = config.defaults
        self.max_block_size = config.max_block_size or max(64, d.block_size)
        self.max_draft_length = min(config.max_draft_length or max(16, d.draft_length),
                                    MAX_MERGED_DRAFT if d.merged else MAX_BLOCK_SIZE)
        self.max_step_tokens = config.max_step_tokens or max(64, d.step_positions)
        self.draining = False  # SIGTERM: new requests get 503 while in-flight ones finish
        self.drain_deadline: float | None = None  # (event-loop time) when in-flight ones are cut
        self.in_flight = 0  # requests whose response has not been sent in full
        self.created = int(time.time())

    def close(self) -> None:
        self.text.close()
        self._parsing.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ request preparation
    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.config.served_model_name:
            raise APIError(f"the model {p._shorten(name)!r} does not exist here; this server serves "
                           f"{self.config.served_model_name!r}", status=404, param="model",
                           code="model_not_found")

    def check_request(self, req: p.CompletionRequest | p.ChatCompletionRequest) -> None:
        """What can be refused from the request's fields alone: the model, fields asking for
        what this server does not do, too many choices."""
        self.check_model(req.model)
        req.refuse_unsupported()
        prompts = len(req.prompt) if isinstance(req, p.CompletionRequest) and _is_batch(req.prompt) else 1
        if not 1 <= req.n <= p.MAX_CHOICES:
            raise APIError(f"n must be in [1, {p.MAX_CHOICES}], got {req.n}", param="n")
        if prompts * req.n > p.MAX_CHOICES:
            raise APIError(f"{prompts} prompts x n={req.n} asks for {prompts * req.n} choices, more "
                           f"than this server answers in one request ({p.MAX_CHOICES})", param="prompt")

    async def read_request(self, request: Request, model: type):
        """The validated request body. JSON bodies only (a browser form or a text/plain body is
        what a web page can send without asking: refused). Parsing runs on a worker thread, so
        a body built to be slow to parse never stalls the event loop (/health, streams)."""
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind != "application/json":
            raise APIError(f"the request body must be JSON with content-type application/json, got "
                           f"{p._shorten(kind or 'none')!r}", status=415, code="unsupported_media_type")
        raw = await self.read_body(request)
        return await asyncio.get_running_loop().run_in_executor(self._parsing, p.parse_request, raw, model)

    async def read_body(self, request: Request) -> bytes:
        """The raw body, refused (413) as soon as it passes `max_body_bytes`, and cut (408) when
        it is not complete `body_timeout` seconds after the headers (a client sending a byte a
        second holds nothing for long), or (503) when a drain's deadline passes while it uploads.
        Each wait is short (`_BODY_POLL`), so a drain that starts meanwhile is seen in time;
        cancelling uvicorn's receive() between messages loses nothing."""
        limit = self.config.max_body_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise _too_large(int(declared), limit)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.body_timeout
        body, size, more = [], 0, True
        while more:
            now = loop.time()
            if self.drain_deadline is not None and now >= self.drain_deadline:
                raise _closing(shutting_down())
            if now >= deadline:
                raise _closing(APIError(
                    f"the request body did not arrive within {self.config.body_timeout:g} s "
                    f"({size:,} bytes came); send it faster", status=408, type="timeout_error",
                    code="body_timeout"))
            try:
                message = await asyncio.wait_for(request.receive(), min(_BODY_POLL, deadline - now))
            except asyncio.TimeoutError:
                continue
            if message["type"] == "http.disconnect":
                raise CLIENT_GONE
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise _too_large(size, limit)
            body.append(chunk)
            more = message.get("more_body", False)
        return b"".join(body)

    def check_admitting(self) -> None:
        if self.draining:
            raise shutting_down()

    async def completion_prompts(self, req: p.CompletionRequest) -> list[list[int]]:
        """Prompt ids of each prompt of the request (one, or a batch of texts or of id lists)."""
        prompts = req.prompt if _is_batch(req.prompt) else [req.prompt]
        if not prompts:
            raise APIError("'prompt' holds no prompt", param="prompt")
        out = []
        for i, prompt in enumerate(prompts):
            param = f"prompt[{i}]" if len(prompts) > 1 else "prompt"
            text = isinstance(prompt, str)
            limit = self.max_prompt_chars if text else self.max_len
            if len(prompt) > limit:
                raise APIError(f"the prompt has {len(prompt):,} {'characters' if text else 'token ids'}, "
                               f"more than this server accepts ({limit:,})", param=param)
            out.append(await self.text.run(lambda tok, x=prompt: self.llm.encode(x, tokenizer=tok),
                                           self.config.text_timeout, param))
        return out

    async def chat_prompt(self, req: p.ChatCompletionRequest) -> list[int]:
        messages = [m.as_template_input() for m in req.messages]
        chars = sum(len(v) for m in messages for v in m.values())
        if chars > self.max_prompt_chars:
            raise APIError(f"the messages hold {chars:,} characters, more than this server accepts "
                           f"({self.max_prompt_chars:,})", param="messages")
        return await self.text.run(
            lambda tok: self.llm.encode_chat(messages, tokenizer=tok, limits=self.template_limits),
            self.config.text_timeout, "messages")

    def decode_params(self, req: p.CompletionRequest | p.ChatCompletionRequest, prompt_len: int,
                      prompt_param: str, choice: int = 0) -> DecodeConfig:
        """The request's DecodeConfig for one of its choices (a seeded request's choice i is
        seeded seed + i, so the n choices differ and each is reproducible). `max_tokens: 0`
        (echo only) is checked as 1: nothing is decoded, but the mode still scores the prompt."""
        if prompt_len >= self.max_len:
            raise APIError(f"the prompt has {prompt_len} tokens but the server's context is "
                           f"{self.max_len}; shorten the prompt", param=prompt_param)
        max_tokens, name = req.max_tokens, "max_tokens"
        if isinstance(req, p.ChatCompletionRequest) and req.max_completion_tokens is not None:
            max_tokens, name = req.max_completion_tokens, "max_completion_tokens"
        if max_tokens == 0 and echo_only(req):
            max_tokens = 1
        if max_tokens is not None and max_tokens < 1:  # said here in the request's own words
            raise APIError(f"{name} must be a positive integer (0 only with \"echo\": true), got "
                           f"{max_tokens}", param=name)
        if max_tokens is None:  # the default never overflows: it stops at the context's end
            max_tokens = min(self.config.defaults.max_new_tokens, self.max_len - prompt_len)
        self.check_shapes(req)
        bias = req.token_bias()
        vocab = self.llm.model.config.vocab_size
        if any(i >= vocab for i, _ in bias):
            raise APIError(f"'logit_bias' names token {max(i for i, _ in bias)}, past the "
                           f"vocabulary ({vocab} tokens)", param="logit_bias")
        sub_block_size = req.sub_block_size
        if req.block_size is not None and sub_block_size is None \
                and 1 <= req.block_size and req.block_size % self.config.defaults.sub_block_size:
            # the default sub-block does not divide the block sent: the largest that does (the
            # request did not choose a sub-block, so it is not blamed for one)
            sub_block_size = max(d for d in range(1, min(req.block_size, self.config.defaults.sub_block_size) + 1)
                                 if req.block_size % d == 0)
        try:
            params = self.llm.decode_config(
                self.config.defaults, max_new_tokens=max_tokens, temperature=req.temperature,
                top_p=req.top_p, top_k=req.top_k,
                seed=None if req.seed is None else req.seed + choice, mode=req.mode,
                block_size=req.block_size, sub_block_size=sub_block_size,
                threshold=req.threshold, rule=req.rule, confidence=req.confidence,
                draft_length=req.draft_length,
                draft_steps=req.draft_steps, draft_cache=req.draft_cache, logit_bias=bias or None,
                presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
                logprobs=logprob_count(req))
        except FastDLLMError as e:
            renames = {"max_new_tokens": name}
            if isinstance(req, p.ChatCompletionRequest):
                renames["logprobs"] = "top_logprobs"
            raise APIError.from_user_error(e, renames) from None
        if prompt_len + params.max_new_tokens > self.max_len:
            raise APIError(f"prompt ({prompt_len} tokens) + {name} ({params.max_new_tokens}) "
                           f"exceeds the server's context of {self.max_len}; lower {name} to "
                           f"at most {self.max_len - prompt_len}", param=name)
        if params.cache_len(prompt_len) > self.positions:
            raise APIError(f"block_size {params.block} rounds this request up past the server's "
                           f"{self.positions} positions; use a block size that divides "
                           f"{self.positions} or lower {name}", param="block_size")
        if params.cache_len(prompt_len) > self.pool_positions:
            raise APIError(f"prompt ({prompt_len} tokens) + {name} ({params.max_new_tokens}) "
                           f"needs {params.cache_len(prompt_len)} KV-cache positions but this "
                           f"server's whole KV cache holds {self.pool_positions}; lower {name} "
                           "(the operator can raise --kv-cache-memory)", param=name)
        if params.step_positions > self.max_step_tokens:
            field = "draft_length" if params.speculative and (
                params.merged or params.draft_length + 1 > params.block_size) else "block_size"
            raise APIError(
                f"{field} {getattr(params, field)} makes each forward carry "
                f"{params.step_positions} positions of this request, more than this server "
                f"allows one request ({self.max_step_tokens}, --max-step-tokens): a step is as slow "
                f"as its widest row, for every request batched with it; lower {field}",
                param=field)
        if params.speculative and not self.speculative:
            raise APIError("this server was not started for speculative decoding; start it with "
                           "--draft-model (or --mode speculative), or send \"mode\": \"ar\"",
                           param="mode")
        if params.diffusion and self.speculative:
            raise APIError("this server decodes speculatively (the target model's own output); "
                           "send \"mode\": \"speculative\" or \"ar\"", param="mode")
        if params.diffusion and self.llm.special.mask_token_id is None:
            raise APIError("diffusion decoding needs a mask token and this checkpoint has none; "
                           "send \"mode\": \"ar\" or start the server with --mask-token-id",
                           param="mode")
        return params

    def check_shapes(self, req) -> None:
        """Server-side bounds on the decoding shapes a request may ask for, and the speculative
        fields only a speculative server reads."""
        if req.block_size is not None and req.block_size > self.max_block_size:
            raise APIError(f"block_size {req.block_size} is larger than this server allows "
                           f"({self.max_block_size}, --max-block-size)", param="block_size")
        for name in ("draft_length", "draft_steps", "draft_cache"):
            if getattr(req, name) is not None and not self.speculative:
                raise APIError(f"'{name}' is for speculative decoding and this server does not "
                               "decode speculatively (start it with --draft-model or --mode "
                               "speculative); leave it out", param=name)
        if req.draft_length is not None and req.draft_length > self.max_draft_length:
            raise APIError(f"draft_length {req.draft_length} is larger than this server allows "
                           f"({self.max_draft_length}, --max-draft-length)", param="draft_length")

    async def score_prompt(self, ids: list[int], params: DecodeConfig, top: int) -> Scores:
        """Log-probabilities of the prompt's tokens after its first (`echo` with `logprobs`),
        the exact log-likelihood of the lm-eval model `fastdllm` (evaluation/loglikelihood.py)
        in the request's mode (speculative output is the target's AR distribution: "ar").
        Runs on the scheduler thread, which owns the model, between two decoding steps."""
        mode = "diffusion" if params.diffusion else "ar"
        model, mask = self.llm.model, self.llm.special.mask_token_id
        return await self.scheduler.call(lambda: continuation_scores(
            model, ids[:1], ids[1:], mode=mode, block_size=params.block_size,
            token_shift=params.token_shift, mask_token_id=mask, top=top))

    # ------------------------------------------------------------------ waiting on a job
    async def next_event(self, job: Job, deadline: float | None) -> Event:
        """The job's next event; an APIError once the deadline has passed."""
        wait = None if deadline is None else deadline - asyncio.get_running_loop().time()
        try:
            if wait is not None and wait <= 0:
                raise asyncio.TimeoutError
            return await asyncio.wait_for(job.events.get(), wait)
        except asyncio.TimeoutError:
            raise APIError(f"the request did not finish within the server's request timeout "
                           f"of {self.config.request_timeout:g} s and was cancelled",
                           status=408, type="timeout_error") from None

    def deadline(self) -> float | None:
        t = self.config.request_timeout
        return None if t is None else asyncio.get_running_loop().time() + t


class TextWorkers:
    """Tokenizing and chat-template rendering, off the event loop: a small pool of threads,
    each with its own tokenizer (a fast tokenizer refuses use from two threads at once), so
    that a long prompt or a slow template never stalls /health or another request. The
    template sandbox stops itself at its deadline; `run`'s own time limit is the backstop and
    counts from when the work starts: time spent queued behind other requests is overload, not
    the request's fault, so a full queue answers 503 with Retry-After, never a 400."""

    def __init__(self, model_dir, workers: int = 2, max_queued: int = 256):
        self._local = threading.local()
        self._model_dir = model_dir
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fastdllm-text")
        self.max_queued = max_queued
        self.queued = 0  # submitted and not finished (event-loop side only)

    def _tokenizer(self):
        if getattr(self._local, "tokenizer", None) is None:
            self._local.tokenizer = load_tokenizer(self._model_dir)
        return self._local.tokenizer

    async def run(self, work, seconds: float, param: str):
        """`work(tokenizer)` on a worker thread; a FastDLLMError becomes a 400 naming its field
        (`param` for the prompt's own problems)."""
        if self.queued >= self.max_queued:
            raise APIError("the server is busy preparing other requests; retry shortly", status=503,
                           type="server_error", code="overloaded", headers={"Retry-After": "1"})
        loop = asyncio.get_running_loop()
        started = loop.create_future()

        def job():
            loop.call_soon_threadsafe(lambda: started.done() or started.set_result(None))
            return work(self._tokenizer())

        self.queued += 1
        future = loop.run_in_executor(self._pool, job)
        try:
            await asyncio.wait({started, future}, return_when=asyncio.FIRST_COMPLETED)
            return await asyncio.wait_for(future, seconds + 1.0)
        except asyncio.TimeoutError:
            raise APIError(f"preparing the {param} took longer than this server's limit of "
                           f"{seconds:g} s", param=param) from None
        except FastDLLMError as e:
            raise APIError.from_user_error(e, {"prompt": param}) from None
        finally:
            self.queued -= 1
            if not future.done():
                future.cancel()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _is_batch(prompt) -> bool:
    """A batch of prompts: texts or id lists (a flat id list is one prompt)."""
    return isinstance(prompt, list) and bool(prompt) and not isinstance(prompt[0], int)


def echo_only(req) -> bool:
    """`max_tokens: 0` with `echo`: the prompt (and its log-probabilities), nothing decoded."""
    return isinstance(req, p.CompletionRequest) and req.echo and req.max_tokens == 0


def logprob_count(req) -> int | None:
    """Alternatives per token the request asks for; None: no log-probabilities."""
    if isinstance(req, p.CompletionRequest):
        return req.logprobs
    return (req.top_logprobs or 0) if req.logprobs else None


_BODY_POLL = 0.25  # seconds: how soon a body read notices a drain's deadline


def _closing(error: APIError) -> APIError:
    """An answer sent before the body was read to its end: the connection cannot carry another
    request, so it says it closes."""
    error.headers = {**(error.headers or {}), "Connection": "close"}
    return error


def _too_large(size: int, limit: int) -> APIError:
    return APIError(f"the request body has {size:,} bytes or more, more than this server accepts "
                    f"({limit:,})", status=413, code="request_too_large")


# nginx's "client closed request": nobody reads this answer
CLIENT_GONE = APIError("the client disconnected", status=499, type="client_disconnected")
