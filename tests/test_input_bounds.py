"""Validation at the boundary, once for every front end (issue 11): DecodeConfig refuses
non-finite or out-of-range numbers and seeds torch cannot take, naming the field, so the
Python API, the CLI and the server all refuse them before a sequence exists; and the chat
template sandbox stops at its deadline even when no other bound is hit."""

from __future__ import annotations

import math
import time

import pytest

from fastdllm.cli import main as cli_main
from fastdllm.engine.params import DecodeConfig
from fastdllm.errors import FastDLLMError

BAD = [
    ("temperature", math.nan), ("temperature", math.inf), ("temperature", 1e-300),
    ("temperature", 1e308), ("temperature", -1.0), ("temperature", True), ("temperature", "1"),
    ("top_p", math.nan), ("top_p", 0.0), ("threshold", math.inf), ("threshold", 0.0),
    ("seed", 2**64), ("seed", 2**63), ("seed", -1), ("seed", 1.0), ("seed", True),
    ("max_new_tokens", 0), ("max_new_tokens", 10**30), ("max_new_tokens", 2.0),
    ("top_k", -1), ("top_k", 2**40), ("block_size", 10**9), ("block_size", 0),
    ("sub_block_size", 3), ("mode", "turbo"), ("mode", None), ("block_cache", 1),
]


@pytest.mark.parametrize("field,value", BAD, ids=[f"{f}={v!r}"[:40] for f, v in BAD])
def test_decode_config_names_the_field(field, value):
    with pytest.raises(FastDLLMError) as e:
        DecodeConfig(**{field: value})
    assert e.value.field == field and field in str(e.value)


def test_bounds_that_are_allowed():
    DecodeConfig(temperature=1e-3, seed=2**63 - 1, top_k=2**31 - 1, threshold=1, top_p=1)
    DecodeConfig(temperature=100.0, seed=0, max_new_tokens=1 << 20)


def test_python_api_refuses_before_decoding(qwen2_ckpt):
    from fastdllm import LLM

    llm = LLM.load(qwen2_ckpt, device="cpu")
    with pytest.raises(FastDLLMError, match="seed"):
        llm.generate("Hi", seed=2**64, temperature=0.7, max_new_tokens=4)
    with pytest.raises(FastDLLMError, match="temperature"):
        llm.generate("Hi", temperature=math.nan, max_new_tokens=4)
    with pytest.raises(FastDLLMError, match="prompt is not valid Unicode"):
        llm.generate("a\ud800", max_new_tokens=4)
    assert llm.generate("Hi", max_new_tokens=4).token_ids  # and it still works


@pytest.mark.parametrize("flag,value", [("--seed", str(2**64)), ("--temperature", "nan"),
                                        ("--temperature", "1e-300"), ("--top-p", "inf")])
def test_cli_refuses_with_exit_2(qwen2_ckpt, capsys, flag, value):
    assert cli_main(["generate", "--model", str(qwen2_ckpt), "--device", "cpu", "--prompt", "Hi",
                     flag, value]) == 2
    err = capsys.readouterr().err
    assert flag.lstrip("-").replace("-", "_") in err and "Traceback" not in err


def test_template_deadline_stops_work_the_budgets_allow():
    """No loop budget or size limit is hit here; only the deadline ends it."""
    from fastdllm.chat_template import TemplateLimits, render_chat

    slow = "{% for i in range(100000) %}{% for j in range(100000) %}{{ '' }}{% endfor %}{% endfor %}"
    t0 = time.monotonic()
    with pytest.raises(FastDLLMError, match="time limit of 0.3 s"):
        render_chat(slow, [{"role": "user", "content": "Hi"}],
                    limits=TemplateLimits(seconds=0.3, max_loop_items=10**12))
    assert time.monotonic() - t0 < 10  # bounded (generous: a loaded CI machine)
