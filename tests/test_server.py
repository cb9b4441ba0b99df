"""The OpenAI-compatible server through the real HTTP stack (uvicorn on 127.0.0.1, the official
`openai` client, httpx): responses, streaming, batching equivalence, disconnects, timeouts.

The tiny checkpoint has random weights, so texts are gibberish: tests compare texts with each
other (streamed vs not, batched vs alone, server vs `LLM.generate`), never with content.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from fastdllm import LLM
from fastdllm.server import BackgroundServer, ServerConfig
from fastdllm.text_stream import TextStream

PROMPTS = ["Once upon a time", "The answer is", "Hello! How can I", "She liked to play",
           "One day, Lily found", "What is two plus two?", "Please write a short story.", "A big red"]


@pytest.fixture(scope="module")
def llm(qwen2_ckpt) -> LLM:
    return LLM.load(qwen2_ckpt, device="cpu")


@pytest.fixture(scope="module")
def server(llm):
    config = ServerConfig(served_model_name="tiny", defaults=llm.decode_config(max_new_tokens=40),
                          max_batch=8)
    with BackgroundServer(llm, config) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0, timeout=60)


def health(server) -> dict:
    return httpx.get(f"{server.url}/health", timeout=30).json()


def wait_idle(server, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        h = health(server)
        if h["active"] == 0 and h["waiting"] == 0:
            return h
        time.sleep(0.02)
    raise AssertionError(f"the server did not become idle: {health(server)}")


def complete(server, **body) -> dict:
    r = httpx.post(f"{server.base_url}/completions", json={"model": "tiny", **body}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def sse_events(lines) -> list:
    """The JSON payloads of an SSE body (and the string "[DONE]")."""
    out = []
    for line in lines:
        if line.startswith("data: "):
            data = line[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


# ---------------------------------------------------------------------------------- TextStream
def _run_stream(tokenizer, ids: list[int], stop=(), step: int = 1) -> tuple[list[str], TextStream]:
    ts = TextStream(lambda x: tokenizer.decode(x, skip_special_tokens=True), stop)
    deltas = [ts.update(ids[:n], finished=False) for n in range(step, len(ids), step)]
    deltas.append(ts.update(ids, finished=True))
    return deltas, ts


def test_text_stream_never_splits_a_character(tiny_tokenizer):
    text = "Grüße, 世界! 🎉 done"
    ids = tiny_tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) > len(text) // 2  # the tiny BPE splits the multi-byte characters into bytes
    deltas, _ = _run_stream(tiny_tokenizer, ids)
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)


def test_text_stream_cuts_at_the_first_stop_string(tiny_tokenizer):
    ids = tiny_tokenizer.encode("one two three four two three", add_special_tokens=False)
    deltas, ts = _run_stream(tiny_tokenizer, ids, stop=("four", "two t"))
    assert "".join(deltas) == "one " and ts.stopped
    deltas, ts = _run_stream(tiny_tokenizer, ids, stop=("xyz",), step=3)
    assert "".join(deltas) == "one two three four two three" and not ts.stopped


# ---------------------------------------------------------------------------------- basics
def test_models_and_health(server):
    models = httpx.get(f"{server.base_url}/models").json()
    assert [m["id"] for m in models["data"]] == ["tiny"]
    h = health(server)
    assert h["status"] == "ok" and h["max_batch"] == 8 and {"active", "waiting"} <= h.keys()


def test_completion_streamed_equals_non_streamed(client, tiny_tokenizer):
    prompt = "Once upon a time there was"
    full = client.completions.create(model="tiny", prompt=prompt, max_tokens=40)
    choice = full.choices[0]
    assert choice.finish_reason in ("stop", "length") and choice.text
    n_prompt = len(tiny_tokenizer.encode(prompt))
    assert full.usage.prompt_tokens == n_prompt
    assert full.usage.total_tokens == n_prompt + full.usage.completion_tokens
    assert 0 < full.usage.completion_tokens <= 40

    chunks = list(client.completions.create(model="tiny", prompt=prompt, max_tokens=40, stream=True,
                                            stream_options={"include_usage": True}))
    assert len([c for c in chunks if c.choices and c.choices[0].text]) > 1  # really streamed
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_chat_streamed_equals_non_streamed(client):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi!"}]
    full = client.chat.completions.create(model="tiny", messages=messages, max_tokens=40)
    msg = full.choices[0].message
    assert msg.role == "assistant" and msg.content
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=40, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == msg.content
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason


def test_server_matches_llm_generate(server, qwen2_ckpt):
    """Same defaults, same answer as the Python API (a separate model instance)."""
    ref_llm = LLM.load(qwen2_ckpt, device="cpu")
    for mode in ("diffusion", "ar"):
        ref = ref_llm.generate("The answer is", max_new_tokens=24, mode=mode)
        out = complete(server, prompt="The answer is", max_tokens=24, mode=mode)
        assert out["choices"][0]["text"] == ref.text
        assert out["usage"]["completion_tokens"] == len(ref.token_ids)
        assert out["choices"][0]["finish_reason"] == ref.finish_reason


def test_stop_strings_cut_the_text(server):
    base = complete(server, prompt="She liked to play", max_tokens=40)["choices"][0]["text"]
    stop = base[len(base) // 2: len(base) // 2 + 2]
    expected = base[: base.index(stop)]
    out = complete(server, prompt="She liked to play", max_tokens=40, stop=[stop, "never-there"])
    assert out["choices"][0] == {**out["choices"][0], "text": expected, "finish_reason": "stop"}
    body = {"model": "tiny", "prompt": "She liked to play", "max_tokens": 40, "stop": stop, "stream": True}
    with httpx.stream("POST", f"{server.base_url}/completions", json=body) as r:
        events = sse_events(r.iter_lines())
    assert events[-1] == "[DONE]"
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == expected
    assert events[-2]["choices"][0]["finish_reason"] == "stop"


# ---------------------------------------------------------------------------------- batching
def _concurrent(server, bodies: list[dict]) -> list[dict]:
    with ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(lambda b: complete(server, **b), bodies))


def _assert_batched_equals_solo(server, bodies: list[dict]) -> None:
    calls0 = health(server)["engine"]["forward_calls"]
    solo = [complete(server, **b) for b in bodies]
    calls1 = health(server)["engine"]["forward_calls"]
    batched = _concurrent(server, bodies)
    calls2 = health(server)["engine"]["forward_calls"]
    for s, b in zip(solo, batched):
        assert b["choices"][0]["text"] == s["choices"][0]["text"]
        assert b["choices"][0]["finish_reason"] == s["choices"][0]["finish_reason"]
        assert b["usage"] == s["usage"]
    assert calls2 - calls1 < calls1 - calls0  # the requests shared forwards
    assert wait_idle(server)["active"] == 0


def test_concurrent_requests_equal_solo(server):
    bodies = [{"prompt": p, "max_tokens": 24 + 2 * i} for i, p in enumerate(PROMPTS)]
    _assert_batched_equals_solo(server, bodies)


def test_concurrent_mixed_modes_equal_solo(server):
    """AR and diffusion rows, different block sizes and thresholds, and seeded sampling (each
    request's generator draws exactly what it would alone) in one batch."""
    options = [{"mode": "ar"}, {"mode": "diffusion"}, {"mode": "diffusion", "block_size": 16},
               {"mode": "diffusion", "threshold": 0.5, "sub_block_size": 4},
               {"mode": "ar", "max_tokens": 12}, {"mode": "diffusion", "temperature": 0.8, "seed": 11},
               {"mode": "ar", "temperature": 0.7, "top_p": 0.9, "seed": 3},
               {"mode": "diffusion", "threshold": 0.7, "temperature": 1.0, "top_k": 20, "seed": 5}]
    bodies = [{"prompt": p, "max_tokens": 30, **o} for p, o in zip(PROMPTS, options)]
    _assert_batched_equals_solo(server, bodies)


def test_concurrent_decoding_rules_equal_solo(server, llm):
    """Requests with different parallel-decoding rules (the request field `rule`) in one batch,
    each as the Python API decodes it alone."""
    options = [{}, {"rule": "left_anchored", "threshold": 0.5}, {"rule": "entropy_bounded", "threshold": 0.5},
               {"rule": "threshold", "threshold": 0.5}]
    bodies = [{"prompt": p, "max_tokens": 30, **o} for p, o in zip(PROMPTS, options)]
    _assert_batched_equals_solo(server, bodies)
    for body in bodies[1:3]:
        expected = llm.generate(body["prompt"], max_new_tokens=30, rule=body["rule"], threshold=0.5)
        assert complete(server, **body)["choices"][0]["text"] == expected.text, body["rule"]


def test_more_requests_than_slots_wait_their_turn(server):
    bodies = [{"prompt": PROMPTS[i % 8], "max_tokens": 8} for i in range(12)]  # 12 > 8 slots
    outs = _concurrent(server, bodies)
    assert [o["choices"][0]["text"] for o in outs[8:]] == [o["choices"][0]["text"] for o in outs[:4]]


# ---------------------------------------------------------------------------------- cancellation
# The long requests below use the official rule at threshold 1: one token per forward in
# confidence order, so the random model writes all 400 tokens (left to right, as the default rule
# goes at threshold 1, it soon meets an end-of-text token and stops).
def test_disconnect_frees_the_slot(server):
    before = health(server)["requests"]["cancelled"]
    body = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 400, "threshold": 1.0, "rule": "threshold",
            "stream": True}
    with httpx.stream("POST", f"{server.base_url}/completions", json=body) as r:
        assert r.status_code == 200
        next(r.iter_lines())  # one chunk, then hang up mid-answer
    h = wait_idle(server)
    assert h["active"] == 0 and h["requests"]["cancelled"] == before + 1
    assert complete(server, prompt="Hello", max_tokens=8)["choices"][0]["finish_reason"]
    assert wait_idle(server)["active"] == 0


def test_disconnect_of_a_non_streamed_request_frees_the_slot(server):
    before = health(server)["requests"]["cancelled"]
    body = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 400, "threshold": 1.0, "rule": "threshold"}
    with pytest.raises(httpx.ReadTimeout):  # the client gives up and hangs up
        httpx.post(f"{server.base_url}/completions", json=body, timeout=0.2)
    h = wait_idle(server)
    assert h["active"] == 0 and h["requests"]["cancelled"] == before + 1


def test_request_timeout(llm):
    config = ServerConfig(served_model_name="tiny", defaults=llm.decode_config(), max_batch=2,
                          request_timeout=0.05)
    slow = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 400, "threshold": 1.0, "rule": "threshold"}
    with BackgroundServer(llm, config) as srv:
        r = httpx.post(f"{srv.base_url}/completions", json=slow, timeout=30)
        assert r.status_code == 408
        err = r.json()["error"]
        assert err["type"] == "timeout_error" and "timeout" in err["message"]
        with httpx.stream("POST", f"{srv.base_url}/completions", json={**slow, "stream": True}) as r:
            events = sse_events(r.iter_lines())
        assert events[-1] == "[DONE]" and events[-2]["error"]["type"] == "timeout_error"
        h = wait_idle(srv)
        assert h["active"] == 0 and h["requests"]["cancelled"] == 2


# ---------------------------------------------------------------------------------- CLI
def test_serve_command(qwen2_ckpt):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "fastdllm.cli", "serve", "--model", str(qwen2_ckpt), "--port", str(port),
           "--served-model-name", "cli-model", "--max-batch", "2", "--max-new-tokens", "8",
           "--log-level", "warning", "--drain-timeout", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "fastdllm serve did not come up"
            time.sleep(0.1)
        r = httpx.post(f"{url}/v1/completions", json={"model": "cli-model", "prompt": "Hi"})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 8
        # SIGTERM with --drain-timeout 0: an in-flight stream is cut with an error event and
        # [DONE] (issue 11: it used to be cut with neither), and the server exits cleanly
        long = {"model": "cli-model", "prompt": "Hello", "mode": "ar", "max_tokens": 400, "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=long, timeout=60) as r:
            lines = []
            for line in r.iter_lines():
                if line.startswith("data: "):
                    if not lines:
                        proc.send_signal(signal.SIGTERM)
                    lines.append(line[6:])
        assert lines[-1] == "[DONE]" and "shutting down" in json.loads(lines[-2])["error"]["message"]
        assert proc.wait(timeout=30) == 0
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_serve_flags_are_validated(qwen2_ckpt, capsys):
    from fastdllm.cli import main

    assert main(["serve", "--model", str(qwen2_ckpt), "--max-batch", "0"]) == 2
    assert "--max-batch" in capsys.readouterr().err
