"""Fault injection through the real HTTP stack on loopback (issue 11): one bad request, template
or fault must never take down the server or anyone else's request.

- the bad-request corpus (tests/data/bad_requests.jsonl): each gets its status and an error body
  naming the field, while a good streamed request runs beside them with its solo output;
- /health answers within 1 s while a hostile template or a huge prompt is being rejected;
- a fault inside one request (admission, the batched draw) fails that request alone;
- a dead scheduler thread is reported by /health (503), never "ok";
- SIGTERM drains: new requests get 503, in-flight ones finish, the rest end with an error
  event and [DONE].

Every request has a client timeout, so a hang fails the test instead of stalling the suite.
"""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

import fastdllm.engine.engine as engine_module
import fastdllm.engine.runner as runner_module
from fastdllm import LLM
from fastdllm.cli import main as cli_main
from fastdllm.engine.sequence import Sequence
from fastdllm.server import BackgroundServer, ServerConfig
from fixtures import bad_requests

pytestmark = pytest.mark.usefixtures("one_thread")
CORPUS = bad_requests()
GOOD = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 48, "threshold": 1.0}
TIMEOUT = 30.0  # per request: a hang fails, it never stalls the suite


def _post(srv, route: str, content: bytes | dict, **kw) -> httpx.Response:
    if isinstance(content, dict):
        content = json.dumps(content).encode()
    return httpx.post(f"{srv.base_url}/{route}", content=content, timeout=kw.pop("timeout", TIMEOUT),
                      headers={"content-type": "application/json"}, **kw)


def _stream_text(srv, body: dict) -> tuple[str, list[str]]:
    """(text, raw data lines) of a streamed completion."""
    with httpx.stream("POST", f"{srv.base_url}/completions", json={**body, "stream": True},
                      timeout=TIMEOUT) as r:
        assert r.status_code == 200, r.read()
        lines = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    events = [json.loads(x) for x in lines if x != "[DONE]"]
    return "".join(e["choices"][0]["text"] for e in events if e.get("choices")), lines


def test_corpus_is_large_and_well_formed():
    assert len(CORPUS) >= 50
    assert len({c["id"] for c in CORPUS}) == len(CORPUS)


def test_bad_request_corpus(strict_server):
    """Every corpus entry: its status and an OpenAI error body naming the field; meanwhile a
    good streamed request gets exactly its solo output, and afterwards the server still serves."""
    srv = strict_server
    solo = _post(srv, "completions", GOOD).json()["choices"][0]["text"]
    beside: dict = {}
    t = threading.Thread(target=lambda: beside.update(text=_stream_text(srv, GOOD)[0]))
    t.start()
    failures = []
    for case in CORPUS:
        r = _post(srv, case["route"], case["content"])
        try:
            err = r.json()["error"]
        except (ValueError, KeyError):
            err = None
        if r.status_code != case["status"] or err is None or err["param"] != case["param"] \
                or not err["message"]:
            failures.append((case["id"], r.status_code, r.text[:200]))
        elif case["param"] is not None:
            assert err["type"] == "invalid_request_error"
    t.join(timeout=TIMEOUT)
    assert not failures, failures
    assert beside["text"] == solo
    assert _post(srv, "completions", GOOD).json()["choices"][0]["text"] == solo
    health = httpx.get(f"{srv.url}/health", timeout=TIMEOUT).json()
    assert health["status"] == "ok" and health["active"] == 0


def _health_stays_responsive(srv, action) -> httpx.Response:
    """Run `action()` on a thread and poll /health until it is done: every poll must answer
    within 1 s. Returns the action's response."""
    out: dict = {}
    t = threading.Thread(target=lambda: out.update(r=action()))
    t.start()
    polls = 0
    while t.is_alive():
        assert httpx.get(f"{srv.url}/health", timeout=1.0).status_code == 200
        polls += 1
        time.sleep(0.05)
    t.join()
    return out["r"]


@pytest.mark.parametrize("trigger,says", [("HOSTILE-LOOP", "loops ran more than"),
                                          ("HOSTILE-ALLOC", "10,000,000,000"),
                                          ("HOSTILE-PAD", "10000000000"),
                                          ("HOSTILE-RECURSE", "recursion")])
def test_hostile_template_is_a_400_naming_the_template(strict_server, trigger, says):
    messages = [{"role": "user", "content": trigger}]
    r = _health_stays_responsive(strict_server, lambda: _post(
        strict_server, "chat/completions", {"model": "tiny", "messages": messages}))
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "messages" and "chat template" in err["message"] and says in err["message"]


def test_huge_prompts_are_refused_before_tokenizing(strict_server):
    for size, status in ((5_000_000, 413), (3_000_000, 400), (10_000_000, 413)):
        body = json.dumps({"model": "tiny", "prompt": "x" * size}).encode()
        r = _health_stays_responsive(strict_server, lambda: _post(strict_server, "completions", body))
        assert r.status_code == status, r.text[:200]
        assert str(f"{size:,}")[:2] in r.json()["error"]["message"]


def test_cli_fails_on_a_hostile_template_with_the_same_message(hostile_template_ckpt, capsys):
    out: dict = {}
    argv = ["generate", "--model", str(hostile_template_ckpt), "--device", "cpu", "--chat",
            "--prompt", "HOSTILE-LOOP", "--max-new-tokens", "4"]
    t = threading.Thread(target=lambda: out.update(code=cli_main(argv)), daemon=True)
    t.start()
    t.join(timeout=TIMEOUT)  # issue 11: it used to run for ever
    assert out.get("code") == 2, "the CLI did not fail within the time limit"
    err = capsys.readouterr().err
    assert "chat template" in err and "loops ran more than" in err and "Traceback" not in err


def test_a_fault_while_admitting_fails_that_request_alone(strict_server, monkeypatch):
    """Issue 11 defect 1: an exception other than FastDLLMError inside engine.add (there: a seed
    torch refused) killed the scheduler thread; now it fails that request alone."""
    begin = Sequence.begin

    def faulty_begin(self):
        if self.params.seed == 424242:
            raise ValueError("injected fault")
        begin(self)

    monkeypatch.setattr(Sequence, "begin", faulty_begin)
    r = _post(strict_server, "completions", {**GOOD, "seed": 424242, "temperature": 0.7})
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
    ok = _post(strict_server, "completions", GOOD)
    assert ok.status_code == 200
    assert httpx.get(f"{strict_server.url}/health", timeout=5).json()["active"] == 0


def test_a_fault_in_the_batched_draw_fails_that_row_alone(strict_server, monkeypatch):
    """Issue 11 defect 2: a row whose sampling raises (there: temperature NaN) failed every
    request batched with it; now its batch-mates keep their solo outputs."""
    real = runner_module.draw  # the step's one draw (engine/runner.py)

    def poisoned(logits, segments, settings, generators):
        if any(s.temperature == 0.5 for s in settings):
            raise RuntimeError("injected fault")
        return real(logits, segments, settings, generators)

    solo = [_post(strict_server, "completions", {**GOOD, "prompt": p}).json()["choices"][0]["text"]
            for p in ("Once upon a time", "The answer is")]
    monkeypatch.setattr(runner_module, "draw", poisoned)
    out: dict = {}

    def good(i, prompt):
        out[i] = _stream_text(strict_server, {**GOOD, "prompt": prompt})[0]

    threads = [threading.Thread(target=good, args=(i, p))
               for i, p in enumerate(("Once upon a time", "The answer is"))]
    for t in threads:
        t.start()
    text, lines = _stream_text(strict_server, {**GOOD, "temperature": 0.5, "seed": 1})
    for t in threads:
        t.join(timeout=TIMEOUT)
    assert "error" in json.loads(lines[-2]) and lines[-1] == "[DONE]"
    assert [out[0], out[1]] == solo


@pytest.fixture
def own_server(qwen2_ckpt):
    """A private server, for tests that break or stop it."""
    llm = LLM.load(qwen2_ckpt, device="cpu")

    def start(**kw) -> BackgroundServer:
        config = ServerConfig(served_model_name="tiny", defaults=llm.decode_config(max_new_tokens=16),
                              max_batch=4, **kw)
        return BackgroundServer(llm, config)

    return start


def test_a_dead_scheduler_is_reported_by_health(own_server):
    with own_server() as srv:
        scheduler = srv.app.state.server.scheduler

        def die(*args, **kwargs):
            raise SystemExit("injected: the scheduler thread dies")

        scheduler._admit = die  # the thread calls it between its steps
        r = _post(srv, "completions", GOOD)
        assert r.status_code == 503 and r.json()["error"]["type"] == "server_error"
        health = httpx.get(f"{srv.url}/health", timeout=5)
        assert health.status_code == 503 and health.json()["status"] == "error"
        assert _post(srv, "completions", GOOD).status_code == 503


def test_drain_lets_requests_finish_then_cuts_the_rest(own_server, monkeypatch):
    """SIGTERM (BackgroundServer.drain is the same handler): new requests get 503 at once; a
    request that finishes within the drain time ends normally; one that cannot is cut with an
    error event and [DONE]."""
    step = engine_module.Engine.step

    def slow_step(self):  # a slow model: every forward takes 20 ms
        time.sleep(0.02)
        return step(self)

    monkeypatch.setattr(engine_module.Engine, "step", slow_step)
    with own_server(drain_timeout=1.5) as srv:
        out: dict = {}
        short = {**GOOD, "prompt": "Hello", "mode": "ar", "max_tokens": 20}
        long = {**GOOD, "prompt": "Hello", "mode": "ar", "max_tokens": 400}  # runs to its length
        threads = [threading.Thread(target=lambda k=k, b=b: out.update({k: _stream_text(srv, b)}))
                   for k, b in (("short", short), ("long", long))]
        for t in threads:
            t.start()
        deadline = time.monotonic() + TIMEOUT
        while httpx.get(f"{srv.url}/health", timeout=5).json()["active"] < 2:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        srv.drain()
        time.sleep(0.1)
        refused = _post(srv, "completions", GOOD)
        assert refused.status_code == 503 and "shutting down" in refused.json()["error"]["message"]
        for t in threads:
            t.join(timeout=TIMEOUT)
        short_events = [json.loads(x) for x in out["short"][1][:-1]]
        assert short_events[-1]["choices"][0]["finish_reason"] == "length"
        assert out["short"][1][-1] == "[DONE]"
        last = json.loads(out["long"][1][-2])
        assert "shutting down" in last["error"]["message"] and out["long"][1][-1] == "[DONE]"
        srv._thread.join(timeout=TIMEOUT)
        assert not srv._thread.is_alive()  # the server exited by itself after the drain
