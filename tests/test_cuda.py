"""The GPU path: the same checkpoints and decoding on CUDA as on CPU.

CI has no GPU, so these tests skip there (the reason is printed); they run on the GPU machine
with `pytest tests/test_cuda.py`.
"""

import dataclasses

import pytest
import torch

from fastdllm import LLM

from fixtures import special_token_ids

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("family", ["qwen2", "llama", "qwen3"])
def test_cuda_fp32_logits_match_cpu(checkpoint_factory, family):
    ckpt = checkpoint_factory(family)
    cpu = LLM.load(ckpt, device="cpu", dtype="float32").model
    gpu = LLM.load(ckpt, device="cuda", dtype="float32").model
    ids = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(40)[None].expand(2, -1)
    with torch.inference_mode():
        a = cpu(ids, pos, None)
        b = gpu(ids.cuda(), pos.cuda(), None).cpu()
    assert (a - b).abs().max() < 1e-3


def test_cuda_bf16_is_default_and_close(qwen2_ckpt):
    llm = LLM.load(qwen2_ckpt, device="cuda")
    assert next(llm.model.parameters()).dtype == torch.bfloat16
    ref = LLM.load(qwen2_ckpt, device="cpu").model
    ids = torch.randint(0, 300, (1, 32), generator=torch.Generator().manual_seed(1))
    pos = torch.arange(32)[None]
    with torch.inference_mode():
        a = torch.softmax(ref(ids, pos, None), -1)
        b = torch.softmax(llm.model(ids.cuda(), pos.cuda(), None).float(), -1).cpu()
    assert (a - b).abs().max() < 0.05


@pytest.mark.parametrize("prompt_len", [5, 8, 13, 16])
def test_cuda_block_cache_exact_and_matches_cpu(qwen2_ckpt, prompt_len):
    mask = special_token_ids()["mask"]
    kw = dict(max_new_tokens=24, block_size=8, sub_block_size=4, threshold=0.5, sub_block_cache=False)
    prompt = list(range(10, 10 + prompt_len))
    gpu = LLM.load(qwen2_ckpt, device="cuda", dtype="float32", mask_token_id=mask)
    cpu = LLM.load(qwen2_ckpt, device="cpu", dtype="float32", mask_token_id=mask)
    cached = gpu.generate(prompt, **kw).token_ids
    assert cached == gpu.generate(prompt, block_cache=False, **kw).token_ids
    assert cached == cpu.generate(prompt, **kw).token_ids


def test_cuda_batch_invariance_bf16(qwen2_ckpt):
    llm = LLM.load(qwen2_ckpt, device="cuda")
    prompts = [list(range(10, 10 + n)) for n in (3, 9, 17, 32)]
    kw = dict(max_new_tokens=20, block_size=8, sub_block_size=4, threshold=0.7)
    batch = llm.generate_batch(prompts, **kw)
    for p, b in zip(prompts, batch):
        assert llm.generate(p, **kw).token_ids == b.token_ids


# ---------------------------------------------------------------- CUDA graphs (issue 10)
def _graph_and_eager(ckpt, **load):
    mask = special_token_ids()["mask"]
    graphs = LLM.load(ckpt, device="cuda", mask_token_id=mask, **load)
    eager = LLM.load(ckpt, device="cuda", mask_token_id=mask, enforce_eager=True, **load)
    graphs.model = eager.model  # the same weights: only the way steps run differs
    return graphs, eager


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda_graphs_equal_eager_token_for_token(qwen2_ckpt, dtype):
    graphs, eager = _graph_and_eager(qwen2_ckpt, dtype=dtype)
    prompts = [list(range(10, 10 + n)) for n in (3, 8, 13, 16, 32, 40)]
    for kw in (dict(mode="ar", max_new_tokens=24),
               dict(max_new_tokens=40, threshold=0.7),
               dict(max_new_tokens=40, threshold=0.7, sub_block_cache=False),
               dict(max_new_tokens=40, threshold=1.0)):
        for batch in (prompts, prompts[:1], prompts[2:5]):
            a = graphs.generate_batch(batch, trace=True, **kw)
            b = eager.generate_batch(batch, trace=True, **kw)
            for x, y in zip(a, b):
                assert x.token_ids == y.token_ids, (kw, len(batch))
                assert [s["positions"] for s in x.trace] == [s["positions"] for s in y.trace]
    static = graphs._engine.runner.static
    assert static is not None and static.mode == "graph" and static.ready  # graphs were captured
    assert eager._engine.runner.static is None


def test_cuda_graphs_with_rows_joining_and_leaving(qwen2_ckpt):
    from fastdllm.engine.params import DecodeConfig

    graphs, eager = _graph_and_eager(qwen2_ckpt)
    engine = graphs.engine(8, 96)
    dif = DecodeConfig(max_new_tokens=30, block_size=32, sub_block_size=8, threshold=0.7)
    ar = DecodeConfig(mode="ar", max_new_tokens=20)
    schedule = {0: [(list(range(10, 15)), dif), (list(range(20, 52)), ar)],
                3: [(list(range(30, 43)), dif), (list(range(40, 44)), ar)],
                7: [(list(range(50, 90)), dataclasses.replace(dif, max_new_tokens=9))]}
    seqs, step = [], 0
    while engine.running or any(k >= step for k in schedule):
        for ids, p in schedule.get(step, []):
            seqs.append(engine.add(ids, p))
        engine.step()
        step += 1
    for seq in seqs:
        ref = eager.generate_batch([seq.tokens[: seq.prompt_len]], config=seq.params)[0]
        assert seq.output_ids() == ref.token_ids

