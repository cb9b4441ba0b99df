"""lm-eval's `local-completions` against the server, with its defaults (tokenized_requests=True:
prompts go as batches of token-id lists): log-likelihoods (echo + logprobs + max_tokens 1)
equal the lm-eval model `fastdllm`'s on the same token ids, greedy flags included, and
generate_until runs the packaged gsm8k_local task to the same texts as `fastdllm`'s model
(the shipped word-problem model: ~8 s on 2 cores, so it stays in the default run)."""

from __future__ import annotations

import pytest

from fastdllm import LLM
from fastdllm.server import BackgroundServer, ServerConfig
from fastdllm.tasks import generate_problems, write_jsonl
from fixtures import REPO_ROOT

pytestmark = pytest.mark.usefixtures("one_thread")
DIFFUSION = REPO_ROOT / "models" / "fastdllm-wp-diffusion"


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM.load(DIFFUSION, device="cpu")


@pytest.fixture(scope="module")
def server(llm):
    config = ServerConfig(served_model_name="wp", defaults=llm.decode_config(max_new_tokens=64),
                          max_batch=4)
    with BackgroundServer(llm, config) as srv:
        yield srv


@pytest.fixture(scope="module")
def api(server):
    pytest.importorskip("tenacity")
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    return LocalCompletionsAPI(model="wp", base_url=f"{server.base_url}/completions",
                               tokenizer=str(DIFFUSION), tokenizer_backend="huggingface",
                               batch_size=2, max_retries=1, max_gen_toks=64)


def test_loglikelihood_equals_the_lm_eval_model(api, llm):
    from lm_eval.api.instance import Instance

    from fastdllm.evaluation.harness import FastDLLMLM

    pairs = [("Mia has 3 pens.", " She buys 4 more."), ("Tom has 5 apples.", " He eats one."),
             ("What is 2 plus 2?", " 4"), ("The answer is", " #### 12")]
    reqs = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    got = api.loglikelihood(reqs, disable_tqdm=True)
    ours = FastDLLMLM(llm=llm, mode="diffusion")
    # the same token ids lm-eval sent (its own tokenization of each pair)
    want = ours._loglikelihood_tokens([(None, *api._encode_pair(*pair)) for pair in pairs])
    assert [g for _, g in got] == [g for _, g in want]
    assert [ll for ll, _ in got] == pytest.approx([ll for ll, _ in want], abs=1e-4)
    assert all(ll < 0 for ll, _ in got)


def test_generate_until_gsm8k_local(api, llm, tmp_path):
    import lm_eval
    from lm_eval.tasks import TaskManager

    from fastdllm.evaluation import TASKS_DIR
    from fastdllm.evaluation.harness import FastDLLMLM

    data = write_jsonl(generate_problems(3, seed=7), tmp_path / "test.jsonl")

    def run(model):
        tm = TaskManager(include_path=str(TASKS_DIR), include_defaults=False,
                         metadata={"data_file": str(data)})
        res = lm_eval.simple_evaluate(model=model, tasks=["gsm8k_local"], task_manager=tm, limit=3,
                                      log_samples=True, gen_kwargs="max_gen_toks=64")
        samples = sorted(res["samples"]["gsm8k_local"], key=lambda s: s["doc_id"])
        return [s["resps"][0][0] for s in samples]

    served = run(api)
    assert all(isinstance(t, str) for t in served) and any(served)
    assert served == run(FastDLLMLM(llm=llm, mode="diffusion", batch_size=3))


def test_local_chat_completions_runs_gsm8k_local(server, tmp_path):
    """lm-eval's chat client (`local-chat-completions`, what chat-only deployments use) runs the
    packaged gsm8k_local task against the server with the chat template applied."""
    pytest.importorskip("tenacity")
    import lm_eval
    from lm_eval.models.openai_completions import LocalChatCompletion
    from lm_eval.tasks import TaskManager

    from fastdllm.evaluation import TASKS_DIR

    data = write_jsonl(generate_problems(2, seed=11), tmp_path / "test.jsonl")
    api = LocalChatCompletion(model="wp", base_url=f"{server.base_url}/chat/completions",
                              max_retries=1, batch_size=1)
    tm = TaskManager(include_path=str(TASKS_DIR), include_defaults=False,
                     metadata={"data_file": str(data)})
    res = lm_eval.simple_evaluate(model=api, tasks=["gsm8k_local"], task_manager=tm, limit=2,
                                  log_samples=True, apply_chat_template=True,
                                  gen_kwargs="max_gen_toks=64")
    texts = [s["resps"][0][0] for s in res["samples"]["gsm8k_local"]]
    assert len(texts) == 2 and all(isinstance(t, str) and t for t in texts)
    assert any(k.startswith("exact_match") for k in res["results"]["gsm8k_local"])
