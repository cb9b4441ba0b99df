"""What the routes stand on: the served model, its scheduler, and turning an OpenAI request into
prompt ids and a `DecodeConfig`.

Every check happens here, before a job is queued, so that each problem is a 4xx naming its
field, and a streamed request never fails after its 200 has been sent. Decoding parameters are
validated by `DecodeConfig` itself; what is left to check is what only the server knows: its
context (`max_model_len`), its engine's positions, and the served model's name.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from fastapi import Request

from ..engine.params import DecodeConfig
from ..errors import FastDLLMError
from ..llm import LLM
from ..model.checkpoint import load_tokenizer
from . import protocol as p
from .protocol import APIError
from .scheduler import Event, Job, Scheduler

@dataclass(frozen=True)
class ServerConfig:
    served_model_name: str
    defaults: DecodeConfig  # decoding defaults: the checkpoint's, then the server's flags
    max_batch: int = 8  # sequences decoded together (engine slots)
    request_timeout: float | None = 600.0  # seconds from arrival to the last token; None = none
    max_model_len: int | None = None  # positions per sequence; None = the model's context

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
        # every slot holds a whole max_len request (continuous batching cannot grow the cache),
        # by the engine's one sizing rule: whole blocks, the last one may overhang max_len
        engine = llm.new_engine(config.max_batch, self.max_len, config.defaults.block_size,
                                context=self.max_len)
        self.positions = engine.max_len
        # the scheduler thread decodes with its own tokenizer, so the event loop's encoding
        # never shares one (fast tokenizers refuse concurrent use from two threads)
        detok = load_tokenizer(llm.model_dir)
        self.scheduler = Scheduler(engine, lambda ids: detok.decode(ids, skip_special_tokens=True))
        self.created = int(time.time())

    # ------------------------------------------------------------------ request preparation
    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.config.served_model_name:
            raise APIError(f"the model {name!r} does not exist here; this server serves "
                           f"{self.config.served_model_name!r}", status=404, param="model")

    def completion_prompt(self, req: p.CompletionRequest) -> list[int]:
        prompt = req.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise APIError("send one prompt per request (concurrent requests are batched by "
                               "the server)", param="prompt")
            prompt = prompt[0]
        try:
            return self.llm.encode(prompt)
        except FastDLLMError as e:
            raise APIError.from_user_error(e) from None

    def chat_prompt(self, req: p.ChatCompletionRequest) -> list[int]:
        try:
            return self.llm.encode_chat([m.as_template_input() for m in req.messages])
        except FastDLLMError as e:
            raise APIError.from_user_error(e, {"prompt": "messages"}) from None

    def decode_params(self, req: p.CompletionRequest | p.ChatCompletionRequest, prompt_len: int,
                      prompt_param: str) -> DecodeConfig:
        if req.n != 1:
            raise APIError(f"only n=1 is supported, got n={req.n}; send several requests instead "
                           "(concurrent requests are batched)", param="n")
        if prompt_len >= self.max_len:
            raise APIError(f"the prompt has {prompt_len} tokens but the server's context is "
                           f"{self.max_len}; shorten the prompt", param=prompt_param)
        max_tokens = req.max_tokens
        if max_tokens is None and isinstance(req, p.ChatCompletionRequest):
            max_tokens = req.max_completion_tokens
        if max_tokens is not None and max_tokens < 1:  # said here in the request's own words
            raise APIError(f"max_tokens must be a positive integer, got {max_tokens}", param="max_tokens")
        if max_tokens is None:  # the default never overflows: it stops at the context's end
            max_tokens = min(self.config.defaults.max_new_tokens, self.max_len - prompt_len)
        try:
            params = self.llm.decode_config(
                self.config.defaults, max_new_tokens=max_tokens, temperature=req.temperature,
                top_p=req.top_p, top_k=req.top_k, seed=req.seed, mode=req.mode,
                block_size=req.block_size, sub_block_size=req.sub_block_size,
                threshold=req.threshold)
        except FastDLLMError as e:
            raise APIError.from_user_error(e) from None
        if prompt_len + params.max_new_tokens > self.max_len:
            raise APIError(f"prompt ({prompt_len} tokens) + max_tokens ({params.max_new_tokens}) "
                           f"exceeds the server's context of {self.max_len}; lower max_tokens to "
                           f"at most {self.max_len - prompt_len}", param="max_tokens")
        if params.cache_len(prompt_len) > self.positions:
            raise APIError(f"block_size {params.block} rounds this request up past the server's "
                           f"{self.positions} positions; use a block size that divides "
                           f"{self.positions} or lower max_tokens", param="block_size")
        if params.diffusion and self.llm.special.mask_token_id is None:
            raise APIError("diffusion decoding needs a mask token and this checkpoint has none; "
                           "send \"mode\": \"ar\" or start the server with --mask-token-id",
                           param="mode")
        return params

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

    async def cancel_on_disconnect(self, request: Request, job: Job) -> None:
        """Run beside a non-streamed request: when its client hangs up, cancel the job (freeing
        its slot now, not when the answer is done) and wake its handler. Starlette does the
        same for streamed responses by cancelling their body generator."""
        while (await request.receive())["type"] != "http.disconnect":
            pass
        self.scheduler.cancel(job)
        job.events.put_nowait(Event(error=CLIENT_GONE))


# nginx's "client closed request": nobody reads this answer
CLIENT_GONE = APIError("the client disconnected", status=499, type="client_disconnected")
