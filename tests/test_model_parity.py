"""Our decoder against transformers' on the same checkpoint directory (STYLE.md principle 10):
full forward, and prefill + chunked forwards through the KV cache, for every supported family,
both RoPE spellings in config.json, and the real stories260K checkpoint."""

from __future__ import annotations

import pytest
import torch

from fastdllm.model.checkpoint import load_model, read_config
from fastdllm.model.config import ModelConfig
from fastdllm.model.kv_cache import KVCache
from fixtures import LLAMA3_ROPE, load_hf_model, read_config_json

ATOL = 1e-4
SEQ_LEN = 40
BATCH = 3

# (fixture name, transformers family)
CHECKPOINTS = [
    ("qwen2_ckpt", "qwen2"),
    ("qwen2_tied_ckpt", "qwen2"),
    ("llama_ckpt", "llama"),
    ("llama3_rope_ckpt", "llama"),
    ("qwen3_ckpt", "qwen3"),
]


def random_batch(vocab_size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (BATCH, SEQ_LEN), generator=g)
    positions = torch.arange(SEQ_LEN).expand(BATCH, SEQ_LEN)
    return ids, positions


def causal_mask(q_positions: torch.Tensor, key_len: int) -> torch.Tensor:
    """(n, 1, T, key_len) bool: query at position p may attend keys at positions <= p."""
    keys = torch.arange(key_len, device=q_positions.device)
    return (keys[None, None, :] <= q_positions[:, :, None])[:, None]


@torch.no_grad()
def cached_logits(model, ids: torch.Tensor, chunks: list[int], rows: str = "slice") -> torch.Tensor:
    """Logits of `ids` fed as a prefill then chunks, through the KV cache. rows='slice': the
    batch sits in slots 0..n-1 (read as a view); 'tensor': scattered slots in a larger cache."""
    n, total = ids.shape
    assert sum(chunks) == total
    cfg = model.config
    slots = n if rows == "slice" else n + 2
    cache = KVCache.regions(cfg.num_layers, slots, total + 8, cfg.num_kv_heads, cfg.head_dim,
                            torch.float32, "cpu")
    row_index = slice(0, n) if rows == "slice" else torch.arange(slots - 1, 1, -1)[:n]
    outs, start = [], 0
    for size in chunks:
        end = start + size
        positions = torch.arange(start, end).expand(n, size)
        access = cache.region_access(row_index, positions, key_len=end)
        outs.append(model(ids[:, start:end], positions, causal_mask(positions, end), access))
        start = end
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("fixture, family", CHECKPOINTS)
def test_logits_match_transformers(request, fixture, family):
    ckpt = request.getfixturevalue(fixture)
    ours = load_model(ckpt)
    ref = load_hf_model(ckpt, family)
    ids, positions = random_batch(ours.config.vocab_size)
    with torch.no_grad():
        expected = ref(input_ids=ids).logits
        got = ours(ids, positions, None)
    assert got.shape == expected.shape == (BATCH, SEQ_LEN, ours.config.vocab_size)
    assert (got - expected).abs().max().item() < ATOL
    # the cached path (prefill, a wide chunk, single tokens, a ragged tail) gives the same logits
    for rows in ("slice", "tensor"):
        cached = cached_logits(ours, ids, [17, 8, 1, 1, 13], rows=rows)
        assert (cached - expected).abs().max().item() < ATOL, rows


def test_explicit_causal_mask_equals_default(qwen2_ckpt):
    model = load_model(qwen2_ckpt)
    ids, positions = random_batch(model.config.vocab_size, seed=1)
    with torch.no_grad():
        default = model(ids, positions, None)
        explicit = model(ids, positions, causal_mask(positions, SEQ_LEN))
        tail = model(ids, positions, None, logits_slice=slice(-5, None))
    torch.testing.assert_close(explicit, default, rtol=0, atol=1e-6)
    torch.testing.assert_close(tail, default[:, -5:], rtol=0, atol=1e-6)


def test_family_flags(qwen2_ckpt, qwen2_tied_ckpt, llama_ckpt, qwen3_ckpt):
    qwen2, tied, llama, qwen3 = (load_model(c) for c in (qwen2_ckpt, qwen2_tied_ckpt, llama_ckpt, qwen3_ckpt))
    assert qwen2.config.qkv_bias and not qwen2.config.o_bias and not qwen2.config.qk_norm
    assert not qwen2.config.tie_word_embeddings
    assert qwen2.lm_head.weight.data_ptr() != qwen2.model.embed_tokens.weight.data_ptr()
    assert tied.config.tie_word_embeddings
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    assert not llama.config.qkv_bias and not llama.config.qk_norm
    assert qwen3.config.qk_norm and not qwen3.config.qkv_bias and qwen3.config.num_layers == 3
    for m in (qwen2, llama, qwen3):
        assert (m.config.num_heads, m.config.num_kv_heads, m.config.head_dim) == (4, 2, 16)


def test_llama3_rope_scaling_matters(llama_ckpt, llama3_rope_ckpt):
    """Same seed, same weights; only RoPE differs, so a parity pass above is not vacuous."""
    cfg, _ = read_config(llama3_rope_ckpt)
    assert cfg.rope.kind == "llama3" and cfg.rope.factor == 8.0
    assert cfg.rope.original_max_position_embeddings == 64
    plain, scaled = load_model(llama_ckpt), load_model(llama3_rope_ckpt)
    ids, positions = random_batch(plain.config.vocab_size)
    with torch.no_grad():
        diff = (plain(ids, positions, None) - scaled(ids, positions, None)).abs().max().item()
    assert diff > 1e-2


@pytest.mark.parametrize("family, kwargs", [
    ("qwen2", dict(legacy_rope=True, rope_theta=1_000_000.0)),  # as published Qwen2.5 configs
    ("llama", dict(legacy_rope=True, rope_scaling=LLAMA3_ROPE)),  # as published Llama-3.x configs
])
def test_legacy_rope_spelling_on_disk(checkpoint_factory, family, kwargs):
    ckpt = checkpoint_factory(family, **kwargs)
    raw = read_config_json(ckpt)
    assert "rope_parameters" not in raw and "rope_theta" in raw
    ours = load_model(ckpt)
    assert ours.config.rope.theta == kwargs.get("rope_theta", 10000.0)
    ref = load_hf_model(ckpt, family)
    ids, positions = random_batch(ours.config.vocab_size)
    with torch.no_grad():
        diff = (ours(ids, positions, None) - ref(input_ids=ids).logits).abs().max().item()
    assert diff < ATOL


_BASE = {"model_type": "llama", "vocab_size": 100, "hidden_size": 64, "intermediate_size": 128,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}


@pytest.mark.parametrize("spelling, expected", [
    ({}, dict(theta=10000.0, kind="default")),
    ({"rope_theta": 1_000_000.0, "rope_scaling": None}, dict(theta=1_000_000.0, kind="default")),
    ({"rope_parameters": {"rope_theta": 500000.0, "rope_type": "default"}}, dict(theta=500000.0, kind="default")),
    ({"rope_theta": 500000.0, "rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}},
     dict(theta=500000.0, kind="llama3", factor=8.0, original_max_position_embeddings=8192)),
    ({"rope_parameters": {"rope_theta": 500000.0, "rope_type": "llama3", "factor": 32.0,
                          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": 8192}},
     dict(theta=500000.0, kind="llama3", factor=32.0)),
    ({"rope_theta": 10000.0, "rope_scaling": {"type": "linear", "factor": 2.0}},
     dict(theta=10000.0, kind="linear", factor=2.0)),
])
def test_rope_config_spellings(spelling, expected):
    rope = ModelConfig.from_hf({**_BASE, **spelling}).rope
    for key, value in expected.items():
        assert getattr(rope, key) == value, key


def test_stories260k_matches_transformers(stories260k_dir):
    """The real trained checkpoint: our logits equal transformers' exactly enough."""
    ours = load_model(stories260k_dir)
    ref = load_hf_model(stories260k_dir, "llama")
    ids, positions = random_batch(ours.config.vocab_size, seed=2)
    with torch.no_grad():
        expected = ref(input_ids=ids).logits
        got = ours(ids, positions, None)
    assert (got - expected).abs().max().item() < ATOL
    cached = cached_logits(ours, ids, [20, 4, 1, 15])
    assert (cached - expected).abs().max().item() < ATOL
