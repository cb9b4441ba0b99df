"""The server on the paged KV cache: what operators see (/metrics, /health pages), prefix hits
reported as OpenAI does (usage.prompt_tokens_details.cached_tokens), and a KV pool
oversubscribed 4x: every request answered, each answer equal to the unloaded one."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from fastdllm import LLM
from fastdllm.model.kv_cache import KVCache
from fastdllm.server import BackgroundServer, ServerConfig

import golden_engine as golden

QUESTIONS = golden.QUESTIONS + ["Sam has 9 marbles and gives away 4. How many are left?",
                                "A box holds 6 eggs. How many eggs are in 5 boxes?"]


def chat(server, content: str, **body) -> dict:
    r = httpx.post(f"{server.base_url}/chat/completions", timeout=120,
                   json={"model": "wp", "messages": [{"role": "user", "content": content}],
                         "max_tokens": 48, **body})
    assert r.status_code == 200, r.text
    return r.json()


def metrics(server) -> dict[str, float]:
    text = httpx.get(f"{server.url}/metrics", timeout=30).text
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


@pytest.fixture(scope="module")
def served():
    llm = LLM.load(golden.DIFF)
    config = ServerConfig(served_model_name="wp", defaults=llm.decode_config(), max_batch=8)
    with BackgroundServer(llm, config) as srv:
        yield srv


def test_metrics_health_and_cached_tokens(served):
    first = chat(served, QUESTIONS[0])
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    again = chat(served, QUESTIONS[0])
    assert again["choices"][0]["message"]["content"] == first["choices"][0]["message"]["content"]
    cached = again["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached > 0 and cached % 32 == 0 and cached < again["usage"]["prompt_tokens"]
    m = metrics(served)
    for gauge in ("fastdllm_requests_running", "fastdllm_requests_waiting", "fastdllm_kv_cache_usage"):
        assert gauge in m
    assert m["fastdllm_prefix_cache_hit_tokens_total"] == cached
    assert m["fastdllm_prefix_cache_queried_tokens_total"] == 2 * first["usage"]["prompt_tokens"]
    assert m["fastdllm_generated_tokens_total"] == (first["usage"]["completion_tokens"]
                                                    + again["usage"]["completion_tokens"])
    assert m["fastdllm_time_to_first_token_seconds_count"] == 2
    assert m["fastdllm_e2e_request_latency_seconds_count"] == 2
    assert 0 <= m["fastdllm_kv_cache_usage"] <= 1
    kv = httpx.get(f"{served.url}/health", timeout=30).json()["kv_cache"]
    assert kv["pages_used"] == 0 and kv["pages_free"] == kv["pages_total"] and kv["pages_cached"] > 0


def test_a_kv_pool_oversubscribed_4x_answers_everything_exactly():
    """Pages for about 2-3 of 8 concurrent requests (max_batch 8): requests wait for pages or
    are preempted and resume; 0 errors, every answer equal to the unloaded server's."""
    llm = LLM.load(golden.DIFF)
    cfg = llm.config
    page = KVCache.bytes_per_page(cfg.num_layers, 32, cfg.num_kv_heads, cfg.head_dim, torch.float32)
    tight = LLM.load(golden.DIFF, kv_cache_memory=8 * page, prefix_caching=False)
    questions = QUESTIONS + [q + " Explain." for q in QUESTIONS[:3]]
    config = ServerConfig(served_model_name="wp", defaults=llm.decode_config(), max_batch=8)
    with BackgroundServer(llm, config) as srv:
        want = [chat(srv, q)["choices"][0]["message"]["content"] for q in questions]
    with BackgroundServer(tight, config) as srv:
        with ThreadPoolExecutor(len(questions)) as pool:
            got = list(pool.map(lambda q: chat(srv, q), questions))
        h = httpx.get(f"{srv.url}/health", timeout=30).json()
    assert [r["choices"][0]["message"]["content"] for r in got] == want
    assert h["kv_cache"]["pages_total"] == 8 and h["requests"]["failed"] == 0
    # how often the pool ran out (waits, preemptions) depends on when the requests arrive;
    # tests/test_engine_paged.py preempts deterministically
