"""A model adapted without token shift (the paper's ablation) says so in config.json, and the
engine then decodes each position from its own output, a block's first position included."""

import torch

from fastdllm import LLM
from fastdllm.model.config import ModelConfig

from fixtures import read_config_json, special_token_ids, update_config


def test_token_shift_round_trips_through_config_json(qwen2_ckpt):
    raw = read_config_json(qwen2_ckpt)
    assert ModelConfig.from_hf(raw).token_shift is True
    assert "token_shift" not in ModelConfig.from_hf(raw).to_hf()
    off = ModelConfig.from_hf({**raw, "token_shift": False})
    assert off.token_shift is False and off.to_hf()["token_shift"] is False


def test_engine_defaults_to_the_checkpoints_token_shift(qwen2_ckpt, ckpt_copy):
    torch.set_num_threads(1)
    d = ckpt_copy(qwen2_ckpt)
    update_config(d, token_shift=False, mask_token_id=special_token_ids()["mask"])
    llm = LLM.load(d)
    assert llm.decode_config().token_shift is False
    prompt = list(range(10, 18))  # one whole block of 8: no token is drawn from the prefill
    out = llm.generate(prompt, max_new_tokens=12, block_size=8, sub_block_size=4, threshold=0.5, trace=True,
                       stop_token_ids=())
    assert len(out.token_ids) == 12
    decoded = sorted(p for step in out.trace for p in step["positions"])
    assert decoded == list(range(8, 20))  # every new position, the block starts included, by refinement
    assert all(step["kind"] in ("full_block", "sub_block") for step in out.trace)
