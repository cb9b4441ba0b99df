"""The GPU path: the same checkpoints and decoding on CUDA as on CPU.

CI has no GPU, so these tests skip there (the reason is printed); they run on the GPU machine
with `pytest tests/test_cuda.py`.
"""

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
