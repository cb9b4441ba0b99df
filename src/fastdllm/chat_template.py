"""Chat templates, rendered in a bounded sandbox.

A checkpoint's chat template is code written by whoever published the checkpoint. Jinja's
immutable sandbox (what transformers renders it in) keeps it away from Python's internals, but
not from running for ever (`{% for i in range(99999) %}{% for j in range(99999) %}...`) or from
allocating gigabytes (`'x' * 10**10`). This renderer bounds both, so every render ends within
`TemplateLimits.seconds` with a `FastDLLMError` that names the template:

- a deadline, checked at every call, filter, attribute or item access, intercepted operator,
  and every 256 iterations of any `for` loop (each loop's iterable is wrapped when the template
  is compiled);
- a budget of loop iterations per render (all loops together);
- `*`, `**`, `+` and `%`, and calls or filters given integer arguments larger than the output
  limit, are refused before they run when their result would be too large;
- the rendered text is cut off at `max_output_chars`.

The environment is transformers' (trim_blocks, lstrip_blocks, loop controls, `tojson`,
`raise_exception`, `strftime_now`, `namespace`, `dict`) and the variables are the same
(`messages`, `add_generation_prompt`, the tokenizer's special tokens), so a well-behaved
template renders exactly as `tokenizer.apply_chat_template` renders it.
"""

from __future__ import annotations

import functools
import json
import re
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Iterable, Iterator

import jinja2
import jinja2.ext
from jinja2 import nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import FastDLLMError

_LOOP_GUARD = "fastdllm_loop_guard"  # the global each compiled `for` loop iterates through
_FORMAT_WIDTH = re.compile(r"%[-#0 +]*(\d+)(?:\.(\d+))?|\{[^{}]*?[:.][^{}\d]*(\d+)")


@dataclass(frozen=True)
class TemplateLimits:
    seconds: float = 5.0  # wall-clock time for one render, compilation included
    max_output_chars: int = 1_000_000  # the rendered text, and any string or list built on the way
    max_loop_items: int = 1_000_000  # iterations of all `for` loops of one render together

    def __post_init__(self):
        if not self.seconds > 0:
            raise FastDLLMError(f"the chat template time limit must be > 0 seconds, got {self.seconds}",
                                field="template_timeout")
        if self.max_output_chars < 1 or self.max_loop_items < 1:
            raise FastDLLMError("the chat template's size limits must be positive", field="chat_template")


class TemplateLimitError(jinja2.TemplateError):
    """The template went past one of its bounds (time, loop work, size)."""


def render_chat(template: str, messages: list[dict[str, Any]], *, limits: TemplateLimits,
                name: str = "the chat template", **variables: Any) -> str:
    """The template rendered for `messages` (a generation prompt added), within `limits`.
    Any failure is a FastDLLMError naming `name` (field "messages")."""
    budget = _Budget(limits)
    _state.budget = budget
    try:
        compiled = _compile(template)
        out, size = [], 0
        for chunk in compiled.generate(messages=messages, add_generation_prompt=True, tools=None,
                                       documents=None, **variables):
            size += len(chunk)
            if size > limits.max_output_chars:
                raise TemplateLimitError(f"its output passed {limits.max_output_chars:,} characters")
            budget.tick()
            out.append(chunk)
        return "".join(out)
    except TemplateLimitError as e:
        raise FastDLLMError(f"{name} was stopped: {e}; the template is broken or hostile (fix or "
                            "replace the checkpoint's chat template)", field="messages") from None
    except (jinja2.TemplateError, RecursionError, MemoryError, ArithmeticError, ValueError,
            TypeError, LookupError, AttributeError) as e:
        detail = str(e) or type(e).__name__
        raise FastDLLMError(f"{name} cannot render these messages: {detail}", field="messages") from None
    finally:
        _state.budget = None


# ------------------------------------------------------------------------------ the budget
_state = threading.local()  # the budget of the render running on this thread


class _Budget:
    def __init__(self, limits: TemplateLimits):
        self.limits = limits
        self.deadline = time.monotonic() + limits.seconds
        self.items_left = limits.max_loop_items

    def tick(self) -> None:
        if time.monotonic() > self.deadline:
            raise TemplateLimitError(f"it ran past its time limit of {self.limits.seconds:g} s")

    def check_size(self, n: int, what: str) -> None:
        if n > self.limits.max_output_chars:
            raise TemplateLimitError(f"{what} would hold {n:,} items, more than the limit of "
                                     f"{self.limits.max_output_chars:,}")


def _budget() -> _Budget:
    budget = getattr(_state, "budget", None)
    return budget if budget is not None else _Budget(TemplateLimits())  # outside render_chat


def _loop_guard(iterable: Iterable) -> Iterator:
    budget = _budget()
    for i, item in enumerate(iterable):
        budget.items_left -= 1
        if budget.items_left < 0:
            raise TemplateLimitError(f"its loops ran more than {budget.limits.max_loop_items:,} "
                                     "iterations")
        if not i & 255:
            budget.tick()
        yield item


def _check_arguments(name: str, args: tuple, kwargs: dict) -> None:
    """Refuse a call or filter (`name`, its input first in `args` when it has one) whose
    result would be too large, before it runs: a single C-level call cannot be interrupted
    by the deadline."""
    budget = _budget()
    budget.tick()
    limit = budget.limits.max_output_chars
    for value in (*args, *kwargs.values()):
        if isinstance(value, int) and not isinstance(value, bool):
            if abs(value) > limit:
                raise TemplateLimitError(f"it passed the number {_short(value)} to {name}, more "
                                         f"than the limit of {limit:,}")
        elif isinstance(value, str) and ("%" in value or "{" in value):
            _check_format(value)
        elif isinstance(value, (list, tuple)) and value:  # what join would build
            budget.check_size(sum(len(x) for x in value if isinstance(x, str)), f"{name}'s input")
    text = args[0] if args and isinstance(args[0], str) else None
    values = [*args[1:], *kwargs.values()]
    if text is not None and name == "replace" and len(values) >= 2:
        old, new = values[0], values[1]
        if isinstance(old, str) and isinstance(new, str):
            budget.check_size(len(text) + text.count(old) * len(new), "a replaced string")
    if text is not None and name == "indent":
        width = next((v for v in values if isinstance(v, int) and not isinstance(v, bool)), 4)
        budget.check_size(len(text) + (text.count("\n") + 1) * abs(width), "an indented string")


def _check_size(value: Any) -> None:
    if isinstance(value, (str, list, tuple, dict)):
        _budget().check_size(len(value), "a value")


def _check_format(fmt: str) -> None:
    limit = _budget().limits.max_output_chars
    for m in _FORMAT_WIDTH.finditer(fmt):
        if any(g and int(g) > limit for g in m.groups()):
            raise TemplateLimitError(f"a format string asks for a width above {limit:,}")


def _short(n: int) -> str:
    return str(n) if n.bit_length() < 64 else f"of {n.bit_length()} bits"


# ------------------------------------------------------------------------------ the sandbox
class _BoundedSandbox(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def __init__(self):
        super().__init__(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
        self.filters["tojson"] = _tojson
        self.filters = {name: _bounded(name, f) for name, f in self.filters.items()}
        self.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now,
                            dict=_TemplateDict(), namespace=_TemplateNamespace)
        self.globals[_LOOP_GUARD] = _loop_guard

    def _parse(self, source, name, filename):
        tree = super()._parse(source, name, filename)
        for loop in tree.find_all(nodes.For):  # for x in <iter>  ->  for x in guard(<iter>)
            loop.iter = nodes.Call(nodes.Name(_LOOP_GUARD, "load", lineno=loop.lineno), [loop.iter],
                                   [], None, None, lineno=loop.lineno)
        return tree

    def call_binop(self, context, operator: str, left: Any, right: Any) -> Any:
        budget = _budget()
        budget.tick()
        limit_bits = 8 * budget.limits.max_output_chars
        ints = (isinstance(left, int) and isinstance(right, int))
        if operator == "**" and ints and right > 0 and abs(left) > 1:
            if right * left.bit_length() > limit_bits:
                raise TemplateLimitError(f"it computes {_short(left)} ** {_short(right)}, too large")
        elif operator == "*":
            if ints and left.bit_length() + right.bit_length() > limit_bits:
                raise TemplateLimitError("it multiplies numbers too large")
            seq, n = (left, right) if isinstance(left, (str, list, tuple)) else (right, left)
            if isinstance(seq, (str, list, tuple)) and isinstance(n, int):
                budget.check_size(len(seq) * n, "a repeated string or list")
        elif operator == "+" and isinstance(left, (str, list, tuple)) and isinstance(right, (str, list, tuple)):
            budget.check_size(len(left) + len(right), "a joined string or list")
        elif operator == "%" and isinstance(left, str):
            _check_format(left)
        return super().call_binop(context, operator, left, right)

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja's signature)
        # 'text'.method(...): the text comes first (the sandbox wraps str.format)
        owner = getattr(getattr(__obj, "__wrapped__", __obj), "__self__", None)
        name = getattr(__obj, "__name__", "a call")
        _check_arguments(name, (owner, *args) if isinstance(owner, str) else args, kwargs)
        rv = super().call(__context, __obj, *args, **kwargs)
        _check_size(rv)
        return rv

    def getattr(self, obj, attribute):
        _budget().tick()
        return super().getattr(obj, attribute)

    def getitem(self, obj, argument):
        _budget().tick()
        return super().getitem(obj, argument)


def _bounded(name: str, f):
    @functools.wraps(f)  # keeps jinja's pass_context / pass_environment marks
    def filter_(*args, **kwargs):
        # drop the context / environment jinja passes first to some filters
        plain = [a for a in args if not isinstance(a, (jinja2.runtime.Context, jinja2.Environment,
                                                        jinja2.nodes.EvalContext))]
        if plain and isinstance(plain[0], int):  # the filtered value itself may be any number
            plain = plain[1:]
            _check_arguments(name, ("",) + tuple(plain), kwargs)
        else:
            _check_arguments(name, tuple(plain), kwargs)
        rv = f(*args, **kwargs)
        _check_size(rv)
        return rv

    return filter_


def _raise_exception(message):
    raise jinja2.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


class _TemplateDict:
    """`dict(...)` in a template, without the type itself (no attribute tricks)."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """`namespace(...)` that refuses underscore names (no path to Python internals)."""

    def __init__(*args, **kwargs):
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for key in attrs:
            _TemplateNamespace._check(key)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, key, value):
        _TemplateNamespace._check(key)
        jinja2.utils.Namespace.__setitem__(self, key, value)

    @staticmethod
    def _check(key):
        if isinstance(key, str) and key.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"a namespace attribute may not start with '_': {key!r}")


_ENV = _BoundedSandbox()


@functools.lru_cache(maxsize=8)
def _compile(template: str) -> jinja2.Template:
    return _ENV.from_string(template)
