"""Issue 21's failure classes of the server under hostile or careless clients, each through the
real HTTP stack (the simple refusals are in the bad-request corpus, tests/data/bad_requests.jsonl,
run by tests/test_fault_injection.py)."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from fastdllm import LLM
from fastdllm.server import BackgroundServer, ServerConfig

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def llm(qwen2_ckpt) -> LLM:
    return LLM.load(qwen2_ckpt, device="cpu")


@pytest.fixture(scope="module")
def server(llm):
    config = ServerConfig(served_model_name="tiny", defaults=llm.decode_config(max_new_tokens=16),
                          max_batch=4)
    with BackgroundServer(llm, config) as srv:
        yield srv


@pytest.fixture(scope="module")
def cors_server(llm):
    config = ServerConfig(served_model_name="tiny", defaults=llm.decode_config(max_new_tokens=16),
                          max_batch=2, allowed_origins=("http://localhost:3000",))
    with BackgroundServer(llm, config) as srv:
        yield srv


def post(server, route, body: dict, **kw) -> httpx.Response:
    return httpx.post(f"{server.base_url}/{route}", json={"model": "tiny", **body}, timeout=60, **kw)


# class 4: parsing is off the event loop
def test_slow_to_parse_bodies_do_not_stall_health(server):
    bomb = b'{"prompt": "Hi", "x": [' + b",".join([b"{}"] * 1_300_000) + b"]}"  # ~4 MB
    assert len(bomb) < 4 << 20
    threads = [threading.Thread(target=httpx.post, args=(f"{server.base_url}/completions",),
                                kwargs={"content": bomb, "timeout": 120,
                                        "headers": {"content-type": "application/json"}})
               for _ in range(2)]
    for t in threads:
        t.start()
    time.sleep(0.3)  # the bodies are uploaded and being parsed
    worst = 0.0
    while any(t.is_alive() for t in threads):
        t0 = time.monotonic()
        assert httpx.get(f"{server.url}/health", timeout=60).status_code == 200
        worst = max(worst, time.monotonic() - t0)
        time.sleep(0.05)
    assert worst < 0.75, f"/health took {worst:.2f} s while bodies were parsed"
    r = httpx.post(f"{server.base_url}/completions", content=bomb, timeout=60,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON objects and arrays" in r.json()["error"]["message"]


# class 12: content type, origins, a block size without its sub-block
@pytest.mark.parametrize("kind", ["text/plain", "application/x-www-form-urlencoded", None])
def test_only_json_bodies(server, kind):
    headers = {"content-type": kind} if kind else {}
    r = httpx.post(f"{server.base_url}/completions", content=b'{"prompt": "Hi", "max_tokens": 2}',
                   headers=headers, timeout=60)
    assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type"


def test_web_pages_are_refused_by_default(server):
    r = post(server, "completions", {"prompt": "Hi", "max_tokens": 2}, headers={"origin": "http://evil.example"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "origin_not_allowed"
    assert "access-control-allow-origin" not in r.headers
    assert post(server, "completions", {"prompt": "Hi", "max_tokens": 2}).status_code == 200  # no Origin


def test_allowed_origins(cors_server):
    body = {"prompt": "Hi", "max_tokens": 2}
    assert post(cors_server, "completions", body, headers={"origin": "http://evil.example"}).status_code == 403
    ok = post(cors_server, "completions", body, headers={"origin": "http://localhost:3000"})
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "http://localhost:3000"


def test_block_size_alone_picks_a_sub_block(server):
    r = post(server, "completions", {"prompt": "Hi", "max_tokens": 6, "block_size": 3})
    assert r.status_code == 200, r.text
    r = post(server, "completions", {"prompt": "Hi", "max_tokens": 6, "block_size": 4, "sub_block_size": 3})
    assert r.status_code == 400 and r.json()["error"]["param"] == "sub_block_size"


# class 13: usage counts the tokens shown, not those decoded past a stop string
def test_completion_tokens_stop_at_the_stop_string(server, llm):
    body = {"prompt": "Once upon a time", "max_tokens": 64, "threshold": 0.05, "rule": "threshold"}
    text = post(server, "completions", body).json()["choices"][0]["text"]
    ref = llm.generate("Once upon a time", max_new_tokens=64, threshold=0.05, rule="threshold").token_ids
    stop = text[3:5]  # early: a step makes a whole sub-block final at once
    expected = text[:text.index(stop)]
    out = post(server, "completions", {**body, "stop": stop}).json()
    assert out["choices"][0]["text"] == expected
    needed = next(n for n in range(len(ref) + 1)
                  if len(llm.tokenizer.decode(ref[:n], skip_special_tokens=True).rstrip("\ufffd")) >= len(expected))
    assert out["usage"]["completion_tokens"] == needed
    # and the logprobs list exactly those tokens
    out = post(server, "completions", {**body, "stop": stop, "logprobs": 0}).json()
    assert len(out["choices"][0]["logprobs"]["tokens"]) == needed


# class 5: time queued behind other requests is overload (503 + Retry-After), never a 400
def test_queueing_does_not_count_against_the_text_timeout(qwen2_ckpt):
    import asyncio

    from fastdllm.server.protocol import APIError
    from fastdllm.server.service import TextWorkers

    workers = TextWorkers(qwen2_ckpt, workers=1, max_queued=3)

    async def flood():
        slow = [asyncio.ensure_future(workers.run(lambda tok: time.sleep(0.8), 1.0, "messages"))
                for _ in range(2)]
        await asyncio.sleep(0.05)
        fast = asyncio.ensure_future(workers.run(lambda tok: "ok", 0.2, "messages"))  # queued 1.6 s
        await asyncio.sleep(0.05)
        with pytest.raises(APIError) as busy:
            await workers.run(lambda tok: "late", 0.2, "messages")
        await asyncio.gather(*slow)
        return await fast, busy.value

    try:
        result, busy = asyncio.run(flood())
    finally:
        workers.close()
    assert result == "ok"
    assert busy.status == 503 and busy.headers == {"Retry-After": "1"}


# classes 1 and 3: on a merged (self-speculative) server, what the engine would refuse after
# queueing (draft_length past the merged form's 32) or fail a whole batch over (top_p below
# float32) is a 400 before anything is queued, streamed too, and its peers are untouched
def test_merged_server_refuses_before_queueing(llm):
    config = ServerConfig(served_model_name="tiny", max_batch=4, defaults=llm.decode_config(
        mode="speculative", merged=True, block_size=64, sub_block_size=8, max_new_tokens=16))
    with BackgroundServer(llm, config) as srv:
        good = {"prompt": "Once upon a time", "max_tokens": 16}
        solo = post(srv, "completions", good).json()["choices"][0]["text"]
        results = {}

        def run_good():
            results["good"] = post(srv, "completions", good).json()["choices"][0]["text"]

        t = threading.Thread(target=run_good)
        t.start()
        for bad, param in (({"draft_length": 40}, "draft_length"), ({"top_p": 1e-46, "temperature": 1.0}, "top_p")):
            for stream in (False, True):
                r = post(srv, "completions", {**good, **bad, "stream": stream})
                assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
        t.join(60)
        assert results["good"] == solo


# class 11: a checkpoint never adapted for block diffusion serves AR by default and refuses
# "mode": "diffusion" with a 400 naming the fix, streamed or not; `serve --mode diffusion` refuses
def test_a_never_adapted_checkpoint_refuses_diffusion(ar_ckpt, capsys):
    from fastdllm.cli import main

    llm = LLM.load(ar_ckpt, device="cpu")
    with BackgroundServer(llm, ServerConfig(served_model_name="tiny", max_batch=2,
                                            defaults=llm.decode_config(max_new_tokens=8))) as srv:
        body = {"prompt": "Once upon a time", "max_tokens": 8}
        out = post(srv, "completions", body)
        assert out.status_code == 200
        assert out.json()["choices"][0]["text"] == llm.generate("Once upon a time", mode="ar",
                                                                max_new_tokens=8).text
        for stream in (False, True):
            r = post(srv, "completions", {**body, "mode": "diffusion", "stream": stream})
            err = r.json()["error"]
            assert r.status_code == 400 and err["param"] == "mode", r.text
            assert "never adapted" in err["message"] and '"mode": "ar"' in err["message"]
            assert "fastdllm train" in err["message"]
    out: dict = {}
    argv = ["serve", "--model", str(ar_ckpt), "--device", "cpu", "--mode", "diffusion", "--port", "0"]
    t = threading.Thread(target=lambda: out.update(code=main(argv)), daemon=True)
    t.start()
    t.join(60)
    assert out.get("code") == 2, "serve --mode diffusion started on a checkpoint never adapted"
    assert "never adapted" in capsys.readouterr().err


# classes 8 and 9: slow clients. A raw socket, since HTTP clients send a body as fast as they can
class SlowClient:
    """A POST whose headers (or body) go out one byte every `interval` seconds; `.response`:
    what the server sent back, `.answered`: when (monotonic), once the server closed."""

    def __init__(self, srv, *, body_bytes: int = 1000, interval: float = 1.0, slow_headers: bool = False):
        import socket

        self.sock = socket.create_connection((srv.host, srv.port), timeout=30)
        head = (f"POST /v1/completions HTTP/1.1\r\nHost: {srv.host}:{srv.port}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {body_bytes}\r\n\r\n").encode()
        self.trickle = head + b'{"prompt": "' if slow_headers else b" " * body_bytes
        if not slow_headers:
            self.sock.sendall(head)
        self.interval, self.response, self.answered = interval, b"", None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        import select

        for i in range(len(self.trickle)):
            try:
                self.sock.send(self.trickle[i:i + 1])
            except OSError:
                pass
            deadline = time.monotonic() + self.interval
            while (wait := deadline - time.monotonic()) > 0:
                if select.select([self.sock], [], [], wait)[0]:
                    try:
                        data = self.sock.recv(65536)
                    except OSError:
                        data = b""
                    if not data:
                        self.answered = time.monotonic()
                        return
                    self.response += data

    def result(self, timeout: float) -> tuple[int, dict, float | None]:
        """(status, JSON body, when answered) once the server has closed the connection."""
        self.thread.join(timeout)
        self.sock.close()
        head, _, body = self.response.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1]) if lines[0] else 0
        headers = dict(line.lower().split(": ", 1) for line in lines[1:] if ": " in line)
        assert headers.get("content-type", "").startswith("application/json"), self.response[:300]
        return status, json.loads(body), self.answered


@pytest.fixture(scope="module")
def slow_limits_server(llm):
    config = ServerConfig(served_model_name="tiny", defaults=llm.decode_config(max_new_tokens=8),
                          max_batch=2, header_timeout=1.5, body_timeout=2.0, limit_concurrency=4)
    with BackgroundServer(llm, config) as srv:
        yield srv


def test_a_slowloris_body_is_cut_while_health_answers(slow_limits_server):
    srv = slow_limits_server
    t0 = time.monotonic()
    client = SlowClient(srv, interval=1.0)  # one byte a second
    worst = 0.0
    while client.thread.is_alive() and time.monotonic() - t0 < 10:
        t = time.monotonic()
        assert httpx.get(f"{srv.url}/health", timeout=5).status_code == 200
        worst = max(worst, time.monotonic() - t)
        time.sleep(0.2)
    status, body, answered = client.result(10)
    assert status == 408 and body["error"]["code"] == "body_timeout", body
    assert answered is not None and answered - t0 < 2.0 + 1.0
    assert worst < 0.5
    # a client as slow with its headers is cut too (uvicorn alone never cuts it)
    t0 = time.monotonic()
    status, body, answered = SlowClient(srv, interval=0.3, slow_headers=True).result(10)
    assert status == 408 and body["error"]["code"] == "header_timeout"
    assert answered - t0 < 1.5 + 1.0
    assert post(srv, "completions", {"prompt": "Hi", "max_tokens": 2}).status_code == 200


def test_connection_cap_answers_at_once_and_idle_connections_are_cut(slow_limits_server):
    """Connections that never send a request fill the cap (4): the next request is answered 503 at
    once (not left to time out), and once the header deadline has cut them, it is served."""
    import socket

    srv = slow_limits_server
    idle = [socket.create_connection((srv.host, srv.port), timeout=5) for _ in range(4)]
    try:
        t0 = time.monotonic()
        assert httpx.get(f"{srv.url}/health", timeout=5).status_code == 503
        assert time.monotonic() - t0 < 0.5
        time.sleep(1.5 + 0.5)  # the header deadline closes the idle ones
        assert httpx.get(f"{srv.url}/health", timeout=5).status_code == 200
        assert all(s.recv(1000).startswith(b"HTTP/1.1 408") for s in idle)
    finally:
        for s in idle:
            s.close()


def test_drain_cuts_a_slow_upload_with_json_503(llm):
    """SIGTERM (BackgroundServer.drain) with a body still uploading: the drain's deadline covers
    it; the uploader gets a JSON 503 at the deadline, and the server exits soon after."""
    config = ServerConfig(served_model_name="tiny", defaults=llm.decode_config(max_new_tokens=8),
                          max_batch=2, drain_timeout=1.5, body_timeout=600)
    with BackgroundServer(llm, config) as srv:
        client = SlowClient(srv, interval=0.1, body_bytes=100_000)
        time.sleep(0.5)
        t0 = time.monotonic()
        srv.drain()
        status, body, answered = client.result(15)
        assert status == 503 and "shutting down" in body["error"]["message"], body
        assert answered - t0 < 1.5 + 1.0
        srv._thread.join(10)
        assert not srv._thread.is_alive() and time.monotonic() - t0 < 1.5 + 4.0


def test_repeated_client_errors_are_logged_once_a_window(server):
    import logging
    import socket

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("uvicorn.error")
    logger.addHandler(handler)
    try:
        for _ in range(30):
            with socket.create_connection((server.host, server.port), timeout=5) as s:
                s.sendall(b"NOT HTTP AT ALL\r\n\r\n")
                s.recv(1000)
    finally:
        logger.removeHandler(handler)
    invalid = [r for r in records if "Invalid HTTP request" in r.getMessage()]
    assert len(invalid) <= 1, len(invalid)


def test_repeat_filter_counts_what_it_left_out():
    import logging

    from fastdllm.server.limits import RepeatFilter

    now = [0.0]
    f = RepeatFilter(window=10.0, clock=lambda: now[0])

    def record(msg: str) -> logging.LogRecord:
        return logging.LogRecord("uvicorn.error", logging.WARNING, __file__, 1, msg, None, None)

    assert f.filter(record("bad request"))
    assert not any(f.filter(record("bad request")) for _ in range(5))
    assert f.filter(record("another message"))
    now[0] = 11.0
    r = record("bad request")
    assert f.filter(r) and "5 more like it" in r.getMessage()


# class 12: a Host header check against DNS rebinding
def test_host_header_is_checked(server):
    from fastdllm.server.limits import allowed_hosts, host_name

    evil = httpx.get(f"{server.url}/health", headers={"host": f"evil.example:{server.port}"}, timeout=10)
    assert evil.status_code == 403 and evil.json()["error"]["code"] == "host_not_allowed"
    r = post(server, "completions", {"prompt": "Hi", "max_tokens": 2}, headers={"host": "rebound.example"})
    assert r.status_code == 403
    for ok in (f"localhost:{server.port}", f"127.0.0.1:{server.port}", "[::1]"):
        assert httpx.get(f"{server.url}/health", headers={"host": ok}, timeout=10).status_code == 200
    assert allowed_hosts("0.0.0.0", None) == ("*",) and allowed_hosts("::1", None) == allowed_hosts("127.0.0.1", None)
    assert allowed_hosts("0.0.0.0", ("api.example",)) == ("api.example",)
    assert host_name("[::1]:8000") == "::1" and host_name("a.example:80") == "a.example"


# class 7: a per-step cost budget. Measured on the shipped model (CPU, 4 rows, docs/serving.md):
# one merged row at draft_length 16 slowed its three K=8 peers' steps 3.9x, at 32 21x, while
# --max-draft-length allowed both; a diffusion row of block 64 costs its peers 1.1x
def test_per_step_cost_budget(llm):
    from fastdllm.engine.params import DecodeConfig

    def shape(**kw) -> int:
        return DecodeConfig(**{"block_size": 32, "sub_block_size": 8, **kw}).step_positions

    assert shape(mode="ar") == 1 and shape() == 32
    assert shape(mode="speculative", draft_length=8) == 32
    assert shape(mode="speculative", merged=True, draft_length=8) == 90
    merged = ServerConfig(served_model_name="tiny", max_batch=2, defaults=llm.decode_config(
        mode="speculative", merged=True, block_size=64, sub_block_size=8, max_new_tokens=8))
    body = {"prompt": "Once upon a time", "max_tokens": 8}
    with BackgroundServer(llm, merged) as srv:  # defaults: draft_length 8, 90 positions
        assert post(srv, "completions", {**body, "draft_length": 8}).status_code == 200
        for stream in (False, True):
            r = post(srv, "completions", {**body, "draft_length": 9, "stream": stream})
            err = r.json()["error"]
            assert r.status_code == 400 and err["param"] == "draft_length", r.text
            assert "110 positions" in err["message"] and "--max-step-tokens" in err["message"]
    wide = ServerConfig(served_model_name="tiny", max_batch=2, max_block_size=256,
                        defaults=llm.decode_config(max_new_tokens=8))
    with BackgroundServer(llm, wide) as srv:  # --max-block-size allows 256, the budget 64
        assert post(srv, "completions", {**body, "block_size": 64}).status_code == 200
        r = post(srv, "completions", {**body, "block_size": 128})
        assert r.status_code == 400 and r.json()["error"]["param"] == "block_size", r.text
