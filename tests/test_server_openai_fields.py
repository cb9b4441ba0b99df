"""The OpenAI request fields real clients send (issue 21), through the real HTTP stack: each is
implemented (logprobs, echo, n, logit_bias, penalties, batched prompts, max_completion_tokens,
GET /v1/models/{id}) or accepted and ignored (metadata, store, service_tier, user,
parallel_tool_calls); the refusals are in tests/test_server_errors.py.

Values are checked against independent computations: a generated token's logprob against the
AR scorer, echoed prompt logprobs against `continuation_logprobs` (the lm-eval model's), and
penalised / biased greedy decoding against a reference loop over uncached forwards."""

from __future__ import annotations

import math

import httpx
import openai
import pytest
import torch

from fastdllm import LLM
from fastdllm.engine.logit_processing import apply_bias, apply_penalties
from fastdllm.evaluation.loglikelihood import continuation_logprobs
from fastdllm.server import BackgroundServer, ServerConfig

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def llm(qwen2_ckpt) -> LLM:
    return LLM.load(qwen2_ckpt, device="cpu")


@pytest.fixture(scope="module")
def server(llm):
    config = ServerConfig(served_model_name="tiny", defaults=llm.decode_config(max_new_tokens=16),
                          max_batch=8)
    with BackgroundServer(llm, config) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0, timeout=120)


def post(server, route: str, **body) -> dict:
    r = httpx.post(f"{server.base_url}/{route}", json={"model": "tiny", **body}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def sse(server, route: str, **body) -> list[dict]:
    with httpx.stream("POST", f"{server.base_url}/{route}",
                      json={"model": "tiny", **body, "stream": True}, timeout=120) as r:
        assert r.status_code == 200
        lines = [x[6:] for x in r.iter_lines() if x.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [httpx.Response(200, content=x).json() for x in lines[:-1]]


# ---------------------------------------------------------------------------------- pure math
def test_penalties_follow_the_openai_formula():
    logits = torch.zeros(2, 6)
    apply_penalties(logits, [1, 1, 3], presence=0.5, frequency=0.25)
    expected = torch.tensor([0, -(0.5 + 2 * 0.25), 0, -(0.5 + 0.25), 0, 0]).expand(2, 6)
    assert torch.equal(logits, expected)
    untouched = torch.zeros(1, 6)
    apply_penalties(untouched, [], presence=2.0, frequency=2.0)
    assert torch.equal(untouched, torch.zeros(1, 6))


def test_bias_is_added_per_token():
    logits = torch.zeros(1, 4)
    apply_bias(logits, ((2, -100.0), (0, 3.5)))
    assert logits.tolist() == [[3.5, 0.0, -100.0, 0.0]]


# ---------------------------------------------------------------------------------- reference
def reference_greedy(llm: LLM, ids: list[int], n: int, *, bias=(), presence=0.0, frequency=0.0) -> list[int]:
    """AR greedy decoding from uncached full forwards, bias and penalties applied by hand."""
    model, out = llm.model, []
    for _ in range(n):
        seq = torch.tensor([ids + out])
        t = seq.shape[1]
        mask = torch.ones(t, t, dtype=torch.bool).tril()[None, None]
        with torch.inference_mode():
            logits = model(seq, torch.arange(t)[None], mask)[0, -1].float()
            for i, v in bias:
                logits[i] += v
            for tok in set(out):
                logits[tok] -= presence + frequency * out.count(tok)
        tok = int(logits.argmax())
        out.append(tok)
        if tok in llm.special.stop_token_ids:
            break
    return out


def token_ids(llm: LLM, text: str) -> list[int]:
    return llm.tokenizer.encode(text, add_special_tokens=False)


def test_penalties_and_bias_match_a_reference_loop(server, llm):
    ids = llm.encode(PROMPT)
    for kw in ({"presence": 0.7, "frequency": 1.3}, {"bias": ((45, -100.0),)}, {"bias": ((7, 6.0),)}):
        body = {"presence_penalty": kw.get("presence", 0.0), "frequency_penalty": kw.get("frequency", 0.0),
                "logit_bias": {str(i): v for i, v in kw.get("bias", ())}}
        out = post(server, "completions", prompt=ids, max_tokens=12, mode="ar", logprobs=0, **body)
        got = out["choices"][0]["logprobs"]["tokens"]
        ref = reference_greedy(llm, ids, 12, **kw)
        assert got == [llm.tokenizer.decode([t]) for t in ref], kw
    plain = reference_greedy(llm, ids, 12)
    assert reference_greedy(llm, ids, 12, presence=0.7, frequency=1.3) != plain  # the test can fail


def test_zero_penalties_and_empty_bias_change_nothing(server):
    """LangChain's `OpenAI` sends frequency_penalty 0, presence_penalty 0, logit_bias {}."""
    for mode in ("diffusion", "ar"):
        plain = post(server, "completions", prompt=PROMPT, max_tokens=16, mode=mode)
        langchain = post(server, "completions", prompt=PROMPT, max_tokens=16, mode=mode, top_p=1,
                         frequency_penalty=0, presence_penalty=0, logit_bias={}, n=1)
        assert langchain["choices"][0]["text"] == plain["choices"][0]["text"]


def test_diffusion_penalty_counts_final_tokens(server, llm):
    """Diffusion with a strong frequency penalty: no token repeats more than the unpenalised
    answer's most repeated one, and the answer differs from it."""
    plain = post(server, "completions", prompt=PROMPT, max_tokens=32, logprobs=0)
    pen = post(server, "completions", prompt=PROMPT, max_tokens=32, logprobs=0, frequency_penalty=2.0)
    a, b = plain["choices"][0]["logprobs"]["tokens"], pen["choices"][0]["logprobs"]["tokens"]
    assert a != b
    assert max(b.count(t) for t in b) < max(a.count(t) for t in a)


# ---------------------------------------------------------------------------------- logprobs
def test_generated_logprobs_are_the_drawn_distributions(server, llm):
    """AR greedy: each token's logprob is log p(token | prefix), what the AR scorer computes;
    the top alternative is the token itself (greedy), alternatives sorted."""
    ids = llm.encode(PROMPT)
    out = post(server, "completions", prompt=ids, max_tokens=10, mode="ar", logprobs=3)
    lp = out["choices"][0]["logprobs"]
    gen = reference_greedy(llm, ids, 10)
    ref, _ = continuation_logprobs(llm.model, ids, gen, mode="ar", block_size=32)
    assert lp["tokens"] == [llm.tokenizer.decode([t]) for t in gen]
    assert lp["token_logprobs"] == pytest.approx(ref.tolist(), abs=1e-4)
    for tok, value, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
        assert len(top) <= 3 and max(top.values()) == pytest.approx(value, abs=1e-6)
    assert out["usage"]["completion_tokens"] == len(lp["tokens"])


def test_chat_logprobs_shape_and_values(client):
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                       max_completion_tokens=8, logprobs=True, top_logprobs=2,
                                       temperature=0.8, seed=3)
    content = r.choices[0].logprobs.content
    # tokens may split a character; their bytes never do
    assert b"".join(bytes(t.bytes) for t in content).decode("utf-8", "replace").startswith(
        r.choices[0].message.content)
    assert len(content) == r.usage.completion_tokens
    for t in content:
        assert t.logprob <= 0 and len(t.top_logprobs) == 2
        assert t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob
    # sampled: where the drawn token is among the alternatives, both report one distribution
    pairs = [(t, x) for t in content for x in t.top_logprobs if x.bytes == t.bytes]
    assert pairs and all(x.logprob == pytest.approx(t.logprob, abs=1e-6) for t, x in pairs)


def test_streamed_logprobs_equal_non_streamed(server):
    body = dict(prompt=PROMPT, max_tokens=16, logprobs=2, n=2, temperature=0.9, seed=5)
    full = post(server, "completions", **body)
    chunks = sse(server, "completions", **body)
    for choice in full["choices"]:
        mine = [c["choices"][0] for c in chunks if c["choices"] and c["choices"][0]["index"] == choice["index"]]
        assert "".join(c["text"] for c in mine) == choice["text"]
        tokens = [t for c in mine if c["logprobs"] for t in c["logprobs"]["tokens"]]
        values = [t for c in mine if c["logprobs"] for t in c["logprobs"]["token_logprobs"]]
        assert tokens == choice["logprobs"]["tokens"]
        assert values == choice["logprobs"]["token_logprobs"]


# ---------------------------------------------------------------------------------- echo
@pytest.mark.parametrize("mode", ["diffusion", "ar"])
def test_echo_scores_the_prompt_like_the_lm_eval_model(server, llm, mode):
    ids = llm.encode("The quick brown fox jumps over the lazy dog and runs into the woods")
    out = post(server, "completions", prompt=ids, max_tokens=0, echo=True, logprobs=1, mode=mode)
    choice = out["choices"][0]
    lp = choice["logprobs"]
    assert choice["text"] == llm.tokenizer.decode(ids, skip_special_tokens=True)
    assert out["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 0, "total_tokens": len(ids),
                            "prompt_tokens_details": {"cached_tokens": 0}}
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    ref, greedy = continuation_logprobs(llm.model, ids[:5], ids[5:], mode=mode, block_size=32,
                                        mask_token_id=llm.special.mask_token_id)
    assert lp["token_logprobs"][5:] == pytest.approx(ref.tolist(), abs=1e-5)
    # lm-eval's greedy test: the token's logprob equals the best alternative's
    assert [v == max(t.values()) for v, t in zip(lp["token_logprobs"][5:], lp["top_logprobs"][5:])] \
        == greedy.tolist()


def test_echo_with_generation_appends_the_answer(server):
    plain = post(server, "completions", prompt=PROMPT, max_tokens=8)["choices"][0]
    echoed = post(server, "completions", prompt=PROMPT, max_tokens=8, echo=True, logprobs=1)["choices"][0]
    assert echoed["text"] == PROMPT + plain["text"]
    n_prompt = len(echoed["logprobs"]["tokens"]) - len(
        post(server, "completions", prompt=PROMPT, max_tokens=8, logprobs=0)["choices"][0]["logprobs"]["tokens"])
    assert echoed["logprobs"]["token_logprobs"][0] is None and n_prompt > 1


# ---------------------------------------------------------------------------------- choices
def test_n_choices_are_seeded_runs(server):
    body = dict(prompt=PROMPT, max_tokens=12, temperature=1.0, seed=11)
    out = post(server, "completions", n=3, **body)
    assert [c["index"] for c in out["choices"]] == [0, 1, 2]
    for c in out["choices"]:
        alone = post(server, "completions", **{**body, "seed": 11 + c["index"]})["choices"][0]
        assert c["text"] == alone["text"]
    assert len({c["text"] for c in out["choices"]}) > 1
    assert out["usage"]["completion_tokens"] > post(server, "completions", **body)["usage"]["completion_tokens"]


def test_batched_prompts_equal_single_requests(server, llm):
    texts = [PROMPT, "The answer is", "A big red"]
    for batch in (texts, [llm.encode(t) for t in texts]):
        out = post(server, "completions", prompt=batch, max_tokens=10, n=2)
        assert [c["index"] for c in out["choices"]] == list(range(6))
        for j, t in enumerate(texts):
            alone = post(server, "completions", prompt=t, max_tokens=10)["choices"][0]["text"]
            assert [out["choices"][2 * j + i]["text"] for i in range(2)] == [alone, alone]
        assert out["usage"]["prompt_tokens"] == sum(len(llm.encode(t)) for t in texts)


def test_chat_n_streamed(server):
    body = dict(messages=[{"role": "user", "content": "Hi"}], max_tokens=8, n=2, temperature=1.0, seed=1)
    full = post(server, "chat/completions", **body)
    chunks = sse(server, "chat/completions", **body)
    for choice in full["choices"]:
        i = choice["index"]
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"][0]["index"] == i)
        assert text == choice["message"]["content"]


# ---------------------------------------------------------------------------------- the rest
def test_ignored_fields_change_nothing(server):
    plain = post(server, "chat/completions", messages=[{"role": "user", "content": "Hi"}], max_tokens=8)
    noisy = post(server, "chat/completions", messages=[{"role": "user", "content": "Hi"}], max_tokens=8,
                 metadata={"k": "v"}, store=False, service_tier="auto", user="me",
                 parallel_tool_calls=True, response_format={"type": "text"}, tool_choice="none",
                 tools=[], modalities=["text"])
    assert noisy["choices"][0]["message"] == plain["choices"][0]["message"]


def test_max_completion_tokens_wins_over_max_tokens(server, llm):
    no_stop = {str(i): -100 for i in llm.special.stop_token_ids}
    out = post(server, "chat/completions", messages=[{"role": "user", "content": "Hi"}],
               max_tokens=12, max_completion_tokens=3, threshold=1.0, logit_bias=no_stop)
    assert out["usage"]["completion_tokens"] == 3
    out = post(server, "chat/completions", messages=[{"role": "user", "content": "Hi"}],
               max_tokens=3, max_completion_tokens=12, threshold=1.0, logit_bias=no_stop)
    assert out["usage"]["completion_tokens"] == 12


def test_model_retrieve(client, server):
    assert client.models.retrieve("tiny").id == "tiny"
    r = httpx.get(f"{server.base_url}/models/gpt-4" + "x" * 5000)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert len(r.text) < 1000


def test_openai_sdk_every_parameter(client):
    """Every request field of the SDK's completions and chat calls this server implements."""
    r = client.completions.create(model="tiny", prompt=[PROMPT, "The answer is"], max_tokens=6, n=2,
                                  temperature=0.7, top_p=0.9, seed=1, stop=["\n\n"], logprobs=2,
                                  echo=True, logit_bias={"5": -100}, presence_penalty=0.1,
                                  frequency_penalty=0.1, best_of=2, suffix="", user="u",
                                  extra_body={"top_k": 20, "threshold": 0.9})
    assert len(r.choices) == 4 and all(c.logprobs.tokens for c in r.choices)
    r = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Hi"}], max_completion_tokens=6, n=2,
        temperature=0.7, top_p=0.9, seed=1, stop="\n\n", logprobs=True, top_logprobs=2,
        logit_bias={"5": -100}, presence_penalty=0.1, frequency_penalty=0.1, metadata={"a": "b"},
        store=False, service_tier="auto", user="u", parallel_tool_calls=False,
        response_format={"type": "text"}, stream_options=None)
    assert len(r.choices) == 2 and all(c.logprobs.content for c in r.choices)
    s = list(client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=6, stream=True,
        stream_options={"include_usage": True}, logprobs=True))
    assert s[-1].usage.completion_tokens > 0
    with pytest.raises(openai.BadRequestError, match="not supported by this server"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                       tools=[{"type": "function", "function": {"name": "f"}}])
