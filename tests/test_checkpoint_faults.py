"""Hostile and broken checkpoints (issue 11): each is refused with one clear FastDLLMError,
before anything large is allocated, never a traceback, a wrong answer or a file read outside
the checkpoint."""

from __future__ import annotations

import json
import os
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from fastdllm import LLM
from fastdllm.model.checkpoint import load_model, load_tokenizer
from fastdllm.errors import FastDLLMError
from fixtures import read_config_json, update_config


def _weights(ckpt):
    return ckpt / "model.safetensors"


def test_truncated_safetensors(qwen2_ckpt, ckpt_copy):
    ckpt = ckpt_copy(qwen2_ckpt)
    data = _weights(ckpt).read_bytes()
    _weights(ckpt).write_bytes(data[: len(data) // 2])
    with pytest.raises(FastDLLMError, match="truncated") as e:
        load_model(ckpt)
    assert "model.safetensors" in str(e.value)


@pytest.mark.parametrize("garble", ["header_length", "header_json", "offsets", "dtype"])
def test_garbled_safetensors(qwen2_ckpt, ckpt_copy, garble):
    ckpt = ckpt_copy(qwen2_ckpt)
    data = bytearray(_weights(ckpt).read_bytes())
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    name = next(k for k in header if k != "__metadata__")
    if garble == "header_length":
        data[:8] = struct.pack("<Q", 10**15)
    elif garble == "header_json":
        data[8:12] = b"\xff\xfe{]"
    else:
        if garble == "offsets":
            header[name]["data_offsets"] = [0, 10**12]
        else:
            header[name]["dtype"] = "I32"
        new = json.dumps(header).encode()
        data = bytearray(struct.pack("<Q", len(new)) + new + bytes(data[8 + n:]))
    _weights(ckpt).write_bytes(bytes(data))
    with pytest.raises(FastDLLMError, match="model.safetensors") as e:
        load_model(ckpt)
    if garble in ("offsets", "dtype"):
        assert name in str(e.value)


@pytest.mark.parametrize("key,value,says", [
    ("hidden_size", "abc", "hidden_size must be an integer"),
    ("num_hidden_layers", True, "num_hidden_layers must be an integer"),
    ("hidden_size", 10**9, "hidden_size must be in"),
    ("vocab_size", 10**12, "vocab_size must be in"),
    ("intermediate_size", 1.5, "intermediate_size must be an integer"),
    ("rms_norm_eps", float("nan"), "rms_norm_eps"),
    ("eos_token_id", "x", "eos_token_id"),
])
def test_config_fields_are_typed_and_bounded(qwen2_ckpt, ckpt_copy, key, value, says):
    ckpt = ckpt_copy(qwen2_ckpt)
    update_config(ckpt, **{key: value})
    with pytest.raises(FastDLLMError, match=says):
        load_model(ckpt)


def test_a_model_too_big_for_the_device_is_refused_with_the_number(qwen2_ckpt, ckpt_copy):
    """Within every per-field bound, yet ~10^13 parameters: refused before allocating."""
    ckpt = ckpt_copy(qwen2_ckpt)
    update_config(ckpt, hidden_size=65536, intermediate_size=262144, num_hidden_layers=1024,
                  num_attention_heads=512, num_key_value_heads=512, head_dim=128, vocab_size=4_000_000)
    with pytest.raises(FastDLLMError, match="parameters") as e:
        load_model(ckpt)
    assert "GiB" in str(e.value) and "free" in str(e.value)


def test_symlink_out_of_the_checkpoint_is_refused(qwen2_ckpt, ckpt_copy, tmp_path):
    ckpt = ckpt_copy(qwen2_ckpt)
    outside = tmp_path / "not-weights.txt"
    outside.write_text("root:x:0:0:root:/root:/bin/bash\n")
    _weights(ckpt).unlink()
    os.symlink(outside, _weights(ckpt))
    with pytest.raises(FastDLLMError, match="outside the checkpoint directory"):
        load_model(ckpt)


def test_symlink_inside_to_a_non_weights_file(qwen2_ckpt, ckpt_copy):
    ckpt = ckpt_copy(qwen2_ckpt)
    _weights(ckpt).unlink()
    os.symlink(ckpt / "config.json", _weights(ckpt))
    with pytest.raises(FastDLLMError, match="not a valid safetensors file"):
        load_model(ckpt)


def test_index_shard_path_outside_the_checkpoint(sharded_ckpt, ckpt_copy, tmp_path):
    ckpt = ckpt_copy(sharded_ckpt)
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    victim = next(iter(index["weight_map"]))
    shard = index["weight_map"][victim]
    (tmp_path / "elsewhere").mkdir()
    (ckpt / shard).rename(tmp_path / "elsewhere" / shard)
    for name, file in index["weight_map"].items():
        if file == shard:
            index["weight_map"][name] = f"../elsewhere/{shard}"
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    assert (ckpt / f"../elsewhere/{shard}").is_file()  # the path does lead to the shard
    with pytest.raises(FastDLLMError, match="outside the checkpoint directory") as e:
        load_model(ckpt)
    assert "../elsewhere" in str(e.value)


@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused(qwen2_ckpt, ckpt_copy, poison):
    ckpt = ckpt_copy(qwen2_ckpt)
    weights = load_file(str(_weights(ckpt)))
    name = "model.layers.0.mlp.up_proj.weight"
    weights[name] = torch.full_like(weights[name], poison)
    save_file(weights, str(_weights(ckpt)))
    with pytest.raises(FastDLLMError, match="NaN or infinite") as e:
        LLM.load(ckpt, device="cpu")
    assert name in str(e.value)


def test_all_nan_weights_are_refused(qwen2_ckpt, ckpt_copy):
    """Issue 11 defect 8: an all-NaN model loaded and generated token 0 forever, exit 0."""
    ckpt = ckpt_copy(qwen2_ckpt)
    weights = {k: torch.full_like(v, float("nan")) for k, v in load_file(str(_weights(ckpt))).items()}
    save_file(weights, str(_weights(ckpt)))
    with pytest.raises(FastDLLMError, match="NaN or infinite"):
        LLM.load(ckpt, device="cpu")


def test_auto_map_tokenizer_never_suggests_remote_code(official_ckpt, ckpt_copy):
    """Issue 11 defect 8: a custom tokenizer class named by auto_map (in a checkpoint whose
    model_type transformers does not know) made transformers tell the user to pass
    trust_remote_code=True, which fastdllm has no way (and no wish) to do."""
    ckpt = ckpt_copy(official_ckpt)
    path = ckpt / "tokenizer_config.json"
    cfg = json.loads(path.read_text())
    cfg.update(tokenizer_class="FancyTokenizer",
               auto_map={"AutoTokenizer": ["tokenization_fancy.FancyTokenizer", None]})
    path.write_text(json.dumps(cfg))
    tok = load_tokenizer(ckpt)  # the standard tokenizer.json, never the code
    assert tok.encode("Once upon a time") == load_tokenizer(official_ckpt).encode("Once upon a time")
    (ckpt / "tokenizer.json").unlink()
    with pytest.raises(FastDLLMError) as e:
        load_tokenizer(ckpt)
    assert "trust_remote_code" not in str(e.value)
    assert read_config_json(ckpt)["vocab_size"]  # the checkpoint itself is untouched otherwise
