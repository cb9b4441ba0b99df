"""The OpenAI wire format: request bodies, response bodies and error bodies.

Requests are validated strictly (a string is not a number, unknown fields are refused, as the
OpenAI API does) and every problem becomes an `APIError` whose body is OpenAI's
`{"error": {"message", "type", "param", "code"}}` with `param` naming the offending field.
Decoding parameters are checked once, by `DecodeConfig` itself; this module only names the
engine's fields as the request's (`REQUEST_FIELDS`) when it words a `FastDLLMError`.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_serializer

from ..errors import FastDLLMError

# fastdllm field names -> the OpenAI request fields that carry them (the rest keep their name)
REQUEST_FIELDS = {"max_new_tokens": "max_tokens", "prompt_ids": "prompt"}


class APIError(Exception):
    """An error answered as an OpenAI-style JSON body with HTTP `status`."""

    def __init__(self, message: str, *, status: int = 400, param: str | None = None,
                 type: str = "invalid_request_error", code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message, self.status, self.param, self.type, self.code = message, status, param, type, code
        self.headers = headers  # e.g. Retry-After on 503

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    @classmethod
    def from_user_error(cls, e: FastDLLMError, renames: dict[str, str] | None = None) -> "APIError":
        """A FastDLLMError raised by the engine or the tokenizer, its field and fixes named as
        request fields; `renames` names fields the other way for one route (prompt -> messages)."""
        names = {**REQUEST_FIELDS, **(renames or {})}

        def spell(field: str, value: Any) -> str:
            name = names.get(field, field)
            return f'"{name}"' if value is None else f'"{name}": {json.dumps(value)}'

        return cls(e.describe(spell), param=names.get(e.field, e.field) if e.field else None)


# ---------------------------------------------------------------------------------- requests
class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    """Fields shared by /v1/completions and /v1/chat/completions; None = the server default."""

    model: str | None = None  # None: the served model
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    logit_bias: dict[str, float] | None = None  # token id (as a string) -> bias in [-100, 100]
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    # accepted and ignored: they change nothing about the answer of a single local server
    user: str | None = None
    metadata: dict[str, Any] | None = None
    store: bool | None = None
    service_tier: str | None = None
    parallel_tool_calls: bool | None = None
    # accepted only at the values that ask for nothing (see `refuse_unsupported`)
    response_format: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    functions: list[Any] | None = None
    function_call: str | dict[str, Any] | None = None
    # fastdllm's own fields (paper §3.3): decoding mode, block / sub-block size, threshold and
    # the parallel-decoding rule it drives ("threshold", "left_anchored", "entropy_bounded")
    mode: str | None = None
    block_size: int | None = None
    sub_block_size: int | None = None
    threshold: float | None = None
    rule: str | None = None
    # which probability of a sampled token the rule reads: "model" (default) or "sampler"
    confidence: str | None = None
    top_k: int | None = None
    # speculative decoding (a server started with --draft-model or --mode speculative);
    # "mode": "ar" opts a request out (the target alone, same output, one token per forward)
    draft_length: int | None = None
    draft_steps: int | None = None
    draft_cache: str | None = None

    def stop_strings(self) -> tuple[str, ...]:
        stops = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        if any(s == "" for s in stops):
            raise APIError("stop strings must not be empty", param="stop")
        if len(stops) > MAX_STOP_SEQUENCES:
            raise APIError(f"'stop' holds {len(stops):,} sequences; this server accepts at most "
                           f"{MAX_STOP_SEQUENCES}", param="stop")
        if any(len(s) > MAX_STOP_CHARS for s in stops):
            raise APIError(f"a stop sequence is longer than this server accepts ({MAX_STOP_CHARS} "
                           "characters)", param="stop")
        return stops

    def refuse_unsupported(self) -> None:
        """A 400 naming the first field that asks for something this server does not do."""
        if self.stream_options is not None and not self.stream:
            raise APIError("'stream_options' is only allowed with \"stream\": true", param="stream_options")
        for name in ("tools", "functions"):
            if getattr(self, name):
                _unsupported(name, "tool calling")
        for name in ("tool_choice", "function_call"):
            if getattr(self, name) not in (None, "none"):
                _unsupported(name, "tool calling")
        if self.response_format is not None and self.response_format != {"type": "text"}:
            _unsupported("response_format", 'structured output; only {"type": "text"} is accepted')

    def token_bias(self) -> tuple[tuple[int, float], ...]:
        """`logit_bias` as (token id, bias) pairs; the keys must be token ids."""
        out = []
        for key, value in (self.logit_bias or {}).items():
            if not (key.isascii() and key.isdigit() and len(key) <= 10):
                raise APIError(f"'logit_bias' keys must be token ids (e.g. \"50256\"), got "
                               f"{_shorten(key)!r}", param="logit_bias")
            out.append((int(key), value))
        return tuple(out)


MAX_STOP_SEQUENCES = 16  # OpenAI allows 4; lm-eval sends its task's stop list plus the EOS
MAX_STOP_CHARS = 256
MAX_CHOICES = 64  # prompts x n of one request


def _unsupported(name: str, what: str) -> None:
    raise APIError(f"'{name}' is not supported by this server ({what})", param=name,
                   code="unsupported_parameter")


def _shorten(text: str, limit: int = 64) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


class CompletionRequest(_Sampling):
    # one prompt (text or token ids) or a batch of them; each gets n choices
    prompt: str | list[int] | list[str] | list[list[int]]
    echo: bool = False  # the answer starts with the prompt (and its log-probabilities)
    logprobs: int | None = None  # log-probabilities of the tokens, with this many alternatives
    suffix: str | None = None  # refused unless empty
    best_of: int | None = None  # refused unless equal to n

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.suffix:
            _unsupported("suffix", "insertion after a suffix")
        if self.best_of is not None and self.best_of != self.n:
            _unsupported("best_of", f"best_of must equal n ({self.n}); send n instead")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]  # OpenAI's roles
    content: str | list[TextPart] | None = None
    name: str | None = None

    def as_template_input(self) -> dict[str, str]:
        text = self.content if isinstance(self.content, str) else "".join(
            p.text for p in self.content or ())
        out = {"role": self.role, "content": text}
        if self.name is not None:
            out["name"] = self.name
        return out


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None  # the newer name of max_tokens; wins over it
    logprobs: bool = False
    top_logprobs: int | None = None  # alternatives per token (needs logprobs: true)
    modalities: list[str] | None = None  # ["text"] only

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError("'top_logprobs' needs \"logprobs\": true", param="top_logprobs")
        if self.modalities not in (None, ["text"]):
            _unsupported("modalities", 'text output only; send ["text"]')


_FIELDS = {name for m in (CompletionRequest, ChatCompletionRequest, ChatMessage, TextPart, StreamOptions)
           for name in m.model_fields}


MAX_JSON_DEPTH = 32  # OpenAI's request bodies nest 5 deep at most
# a batch of 64 prompts of token ids is 65 arrays; a chat of 10,000 messages with parts ~30,000
MAX_JSON_CONTAINERS = 65536
_MAX_INT_DIGITS = 40  # longer integers are kept as text, so that the field's check names them


def parse_request(raw: bytes, model: type[_Strict]) -> Any:
    """Raw body -> a validated request, or an APIError naming the first bad field."""
    containers = raw.count(b"{") + raw.count(b"[")  # an upper bound: brackets in strings count too
    if containers > MAX_JSON_CONTAINERS:
        # json.loads holds the GIL for its whole run: a body of a million empty objects would
        # stall the event loop's thread too, even parsed on a worker thread
        raise APIError(f"the request body holds {containers:,} JSON objects and arrays (counting "
                       f"brackets inside strings), more than this server parses ({MAX_JSON_CONTAINERS:,})")
    try:
        data = json.loads(raw, parse_int=_parse_int)
    except RecursionError:
        raise APIError(f"the request body nests deeper than {MAX_JSON_DEPTH} levels") from None
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise APIError(f"the request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise APIError("the request body must be a JSON object")
    _check_depth(data)
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise _validation_error(e) from None


def _parse_int(text: str) -> int | str:
    # int() of a 5000-digit number raises (Python's int-string limit); such a value is no
    # valid setting of any field, so it stays a string and fails that field's type check
    return int(text) if len(text) <= _MAX_INT_DIGITS else text


def _check_depth(data: Any) -> None:
    stack = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise APIError(f"the request body nests deeper than {MAX_JSON_DEPTH} levels")
        children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))


def _validation_error(e: ValidationError) -> APIError:
    errors = e.errors()
    first = errors[0]
    param = _param_path(first["loc"])
    if first["type"] == "missing":
        return APIError(f"'{param}' is a required field", param=param)
    if first["type"] == "extra_forbidden":  # the unknown name is not one of _FIELDS
        param = _param_path(first["loc"][:-1])
        param = f"{param}.{first['loc'][-1]}" if param != "body" else str(first["loc"][-1])
        param = _shorten(param)  # a client may send a megabyte-long field name
        return APIError(f"'{param}' is not supported by this server (not a field of its OpenAI "
                        "API; docs/serving.md lists the fields it takes)", param=param,
                        code="unsupported_parameter")
    # a union reports one error per member type ('prompt', 'str'), ('prompt', 'list[int]', 1):
    # name the acceptable types instead of the first member's complaint
    tag_at = next((i for i, part in enumerate(first["loc"]) if _is_union_tag(part)), None)
    if tag_at is not None:
        prefix = first["loc"][:tag_at]
        tags = dict.fromkeys(err["loc"][tag_at] for err in errors
                             if err["loc"][:tag_at] == prefix and len(err["loc"]) > tag_at
                             and _is_union_tag(err["loc"][tag_at]))
        return APIError(f"'{param}' must be one of: {', '.join(tags)}", param=param)
    return APIError(f"'{param}': {first['msg']}", param=param)


def _is_union_tag(part) -> bool:
    return isinstance(part, str) and part not in _FIELDS


def _param_path(loc: tuple) -> str:
    """('messages', 0, 'role') -> 'messages[0].role'; pydantic's union-member tags
    ('str', 'list[int]') are left out."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in _FIELDS:
            out += f".{part}" if out else part
    return out or "body"


# ---------------------------------------------------------------------------------- responses
class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class CompletionLogprobs(BaseModel):
    """The legacy completions shape: one entry per token (the echoed prompt's first is None)."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None] | None
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob] | None
    refusal: None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None

    @field_serializer("delta")
    def _delta(self, delta: ChatDelta) -> dict:  # OpenAI leaves unset delta fields out
        return delta.model_dump(exclude_none=True)


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "fastdllm"
    max_model_len: int = Field(description="positions a prompt plus its answer may use")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
