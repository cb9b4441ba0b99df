"""Loading checkpoints from disk: sharded weights, the official Fast_dLLM_v2 layout (remote code
never runs), special-token resolution, every user error as a FastDLLMError that says what to
do, and atomic `save_checkpoint` round trips."""

from __future__ import annotations

import importlib.util
import json
import os
import pickle
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import fastdllm.model.checkpoint as checkpoint_mod
from fastdllm.model.checkpoint import (
    load_model,
    load_tokenizer,
    read_config,
    resolve_model_dir,
    resolve_special_tokens,
    save_checkpoint,
)
from fastdllm.errors import FastDLLMError
from fixtures import (
    ENDOFTEXT,
    REPO_ROOT,
    load_hf_model,
    read_config_json,
    remote_code_ran,
    special_token_ids,
    update_config,
    write_tokenizer,
)

# Published Fast_dLLM_v2 configs carry "rope_scaling": null, which transformers 5 (reading
# config.json while loading the tokenizer) warns about.
pytestmark = pytest.mark.filterwarnings("ignore:`rope_scaling` is deprecated:FutureWarning")


def logits(model, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=g)
    with torch.no_grad():
        return model(ids, torch.arange(24).expand(2, 24), None)


def special_tokens(model_dir: Path, **kwargs):
    cfg, _ = read_config(model_dir)
    return resolve_special_tokens(cfg, model_dir, load_tokenizer(model_dir), **kwargs)


def dir_listing(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


# ---------------------------------------------------------------- sharded and official layouts

def test_sharded_load_equals_single_file(qwen2_ckpt, sharded_ckpt):
    shards = sorted(sharded_ckpt.glob("*.safetensors"))
    assert len(shards) >= 2 and (sharded_ckpt / "model.safetensors.index.json").is_file()
    single, sharded = load_model(qwen2_ckpt), load_model(sharded_ckpt)
    for (name, a), (_, b) in zip(single.state_dict().items(), sharded.state_dict().items()):
        assert torch.equal(a, b), name
    assert torch.equal(logits(single), logits(sharded))


def test_sharded_index_with_missing_shard(sharded_ckpt, ckpt_copy):
    ckpt = ckpt_copy(sharded_ckpt)
    victim = sorted(ckpt.glob("*.safetensors"))[-1]
    victim.unlink()
    with pytest.raises(FastDLLMError, match="missing") as e:
        load_model(ckpt)
    assert victim.name in str(e.value)


@pytest.mark.parametrize("bd_size", [32, 8])
def test_official_layout_loads_without_remote_code(checkpoint_factory, qwen2_ckpt, bd_size):
    ckpt = checkpoint_factory("qwen2", official_layout=True, bd_size=bd_size)
    raw = read_config_json(ckpt)
    assert raw["model_type"] == "Fast_dLLM_Qwen" and "auto_map" in raw and "mask_token_id" not in raw
    assert (ckpt / "modeling.py").is_file() and (ckpt / "configuration.py").is_file()

    cfg, _ = read_config(ckpt)
    assert cfg.bd_size == bd_size and cfg.mask_token_id is None and cfg.qkv_bias
    model = load_model(ckpt)
    tokenizer = load_tokenizer(ckpt)
    assert tokenizer is not None
    tokens = resolve_special_tokens(cfg, ckpt, tokenizer)
    assert tokens.mask_token_id == special_token_ids()["mask"]
    # same seed and shapes as the plain qwen2 fixture: same weights, same logits
    assert torch.equal(logits(model), logits(load_model(qwen2_ckpt)))
    assert not remote_code_ran(ckpt)


def test_remote_code_trap_works(official_ckpt, ckpt_copy):
    """The fixture's modeling.py does leave the sentinel when imported, so the checks that it
    is absent above mean something."""
    ckpt = ckpt_copy(official_ckpt)
    spec = importlib.util.spec_from_file_location("fixture_remote_modeling", ckpt / "modeling.py")
    with pytest.raises(RuntimeError, match="remote code"):
        spec.loader.exec_module(importlib.util.module_from_spec(spec))
    assert remote_code_ran(ckpt)


def test_official_layout_mask_id_precedence(official_ckpt, ckpt_copy):
    mask = special_token_ids()["mask"]
    assert special_tokens(official_ckpt).mask_token_id == mask
    assert special_tokens(official_ckpt, mask_token_id=5).mask_token_id == 5  # explicit wins
    ckpt = ckpt_copy(official_ckpt)
    update_config(ckpt, mask_token_id=7)  # config.json wins over the tokenizer
    assert special_tokens(ckpt).mask_token_id == 7
    assert special_tokens(ckpt, mask_token_id=9).mask_token_id == 9
    assert not remote_code_ran(official_ckpt)


def test_no_tokenizer_files(no_tokenizer_ckpt):
    assert load_tokenizer(no_tokenizer_ckpt) is None
    load_model(no_tokenizer_ckpt)
    tokens = special_tokens(no_tokenizer_ckpt)
    assert tokens.mask_token_id is None  # nothing names a mask: the caller must pass one
    assert tokens.stop_token_ids == (special_token_ids()["im_end"], special_token_ids()["endoftext"])


def test_plain_ar_checkpoint_has_no_mask(stories260k_dir):
    """A real AR checkpoint (unk token, no |<MASK>|): no mask id is invented; stop ids come
    from its generation_config.json."""
    tokens = special_tokens(stories260k_dir)
    assert tokens.mask_token_id is None
    assert tokens.stop_token_ids == (2, 1)


# ---------------------------------------------------------------- stop ids

def test_stop_ids_resolution_order(qwen2_ckpt, ckpt_copy):
    ids = special_token_ids()
    ckpt = ckpt_copy(qwen2_ckpt)
    write_tokenizer(ckpt, eos_token=ENDOFTEXT)  # tokenizer eos differs from every file below
    update_config(ckpt, eos_token_id=[7, 8])
    (ckpt / "generation_config.json").write_text(json.dumps({"eos_token_id": 5}))

    assert special_tokens(ckpt, stop_token_ids=(9, 10)).stop_token_ids == (9, 10)  # explicit
    assert special_tokens(ckpt).stop_token_ids == (5,)  # generation_config.json
    (ckpt / "generation_config.json").write_text(json.dumps({"bos_token_id": 0}))
    assert special_tokens(ckpt).stop_token_ids == (7, 8)  # config.json
    (ckpt / "generation_config.json").unlink()
    assert special_tokens(ckpt).stop_token_ids == (7, 8)
    update_config(ckpt, remove=("eos_token_id",))
    assert special_tokens(ckpt).stop_token_ids == (ids["endoftext"],)  # tokenizer eos
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (ckpt / name).unlink()
    assert special_tokens(ckpt).stop_token_ids == ()


def test_stop_id_outside_vocab(qwen2_ckpt):
    vocab = read_config_json(qwen2_ckpt)["vocab_size"]
    with pytest.raises(FastDLLMError, match="outside the vocabulary"):
        special_tokens(qwen2_ckpt, stop_token_ids=(vocab,))


# ---------------------------------------------------------------- user errors

def test_missing_directory(tmp_path):
    with pytest.raises(FastDLLMError, match="does not exist"):
        resolve_model_dir(tmp_path / "no-such-checkpoint")
    with pytest.raises(FastDLLMError, match="does not exist"):
        resolve_model_dir("no-such-checkpoint-dir")


def test_file_instead_of_directory(qwen2_ckpt):
    with pytest.raises(FastDLLMError, match="is a file") as e:
        resolve_model_dir(qwen2_ckpt / "config.json")
    assert "directory" in str(e.value)


def test_directory_without_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(FastDLLMError, match="no config.json"):
        load_model(tmp_path)


def test_invalid_config_json(qwen2_ckpt, ckpt_copy):
    ckpt = ckpt_copy(qwen2_ckpt)
    (ckpt / "config.json").write_text("{not json")
    with pytest.raises(FastDLLMError, match="not valid JSON"):
        load_model(ckpt)


def test_config_missing_required_key(qwen2_ckpt, ckpt_copy):
    ckpt = ckpt_copy(qwen2_ckpt)
    update_config(ckpt, remove=("hidden_size",))
    with pytest.raises(FastDLLMError, match="hidden_size"):
        load_model(ckpt)


def test_unsupported_model_type(qwen2_ckpt, ckpt_copy):
    ckpt = ckpt_copy(qwen2_ckpt)
    update_config(ckpt, model_type="gpt2", architectures=["GPT2LMHeadModel"])
    with pytest.raises(FastDLLMError, match="unsupported architecture") as e:
        load_model(ckpt)
    assert "'gpt2'" in str(e.value) and "qwen2" in str(e.value) and "Fast_dLLM_Qwen" in str(e.value)


class _PickleBomb:
    """Unpickling this creates a directory: proof that a pickle was loaded."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def test_pickle_weights_refused(qwen2_ckpt, ckpt_copy, tmp_path):
    ckpt = ckpt_copy(qwen2_ckpt)
    for f in ckpt.glob("*.safetensors"):
        f.unlink()
    sentinel = tmp_path / "pickle-was-loaded"
    (ckpt / "pytorch_model.bin").write_bytes(pickle.dumps({"weights": _PickleBomb(str(sentinel))}))
    with pytest.raises(FastDLLMError, match="safetensors") as e:
        load_model(ckpt)
    assert "pickle" in str(e.value)
    assert not sentinel.exists()


def test_no_weight_files(qwen2_ckpt, ckpt_copy):
    ckpt = ckpt_copy(qwen2_ckpt)
    for f in ckpt.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(FastDLLMError, match="no \\*.safetensors"):
        load_model(ckpt)


def test_shape_mismatch(qwen2_ckpt, ckpt_copy):
    ckpt = ckpt_copy(qwen2_ckpt)
    update_config(ckpt, intermediate_size=96)
    with pytest.raises(FastDLLMError, match="shape") as e:
        load_model(ckpt)
    assert "mlp" in str(e.value) and "96" in str(e.value)


def test_unexpected_and_missing_tensors(qwen2_ckpt, ckpt_copy):
    ckpt = ckpt_copy(qwen2_ckpt)
    update_config(ckpt, num_hidden_layers=1)
    with pytest.raises(FastDLLMError, match="unexpected tensor 'model.layers.1"):
        load_model(ckpt)

    ckpt = ckpt_copy(qwen2_ckpt)
    weights = load_file(str(ckpt / "model.safetensors"))
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, str(ckpt / "model.safetensors"))
    with pytest.raises(FastDLLMError, match="missing") as e:
        load_model(ckpt)
    assert "model.layers.1.mlp.up_proj.weight" in str(e.value)


def test_mask_id_outside_vocab(qwen2_ckpt, ckpt_copy):
    vocab = read_config_json(qwen2_ckpt)["vocab_size"]
    with pytest.raises(FastDLLMError, match="outside the vocabulary") as e:
        special_tokens(qwen2_ckpt, mask_token_id=vocab + 3)
    assert e.value.field == "mask_token_id"
    ckpt = ckpt_copy(qwen2_ckpt)
    update_config(ckpt, mask_token_id=vocab)
    with pytest.raises(FastDLLMError, match="mask_token_id"):
        read_config(ckpt)


# ---------------------------------------------------------------- save_checkpoint

@pytest.mark.parametrize("fixture, family", [
    ("qwen2_ckpt", "qwen2"), ("qwen2_tied_ckpt", "qwen2"),
    ("llama3_rope_ckpt", "llama"), ("qwen3_ckpt", "qwen3"),
])
def test_save_round_trip(request, tmp_path, fixture, family):
    src = request.getfixturevalue(fixture)
    model, tokenizer = load_model(src), load_tokenizer(src)
    generation_config = json.loads((src / "generation_config.json").read_text())
    out = save_checkpoint(tmp_path / "out", model, tokenizer=tokenizer,
                          generation_config=generation_config)
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    reloaded = load_model(out)
    assert reloaded.config == model.config
    assert torch.equal(logits(reloaded), logits(model))
    # the written config.json is one transformers itself reads to the same model
    ref = load_hf_model(out, family)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=g)
    with torch.no_grad():
        assert (ref(input_ids=ids).logits - logits(model)).abs().max().item() < 1e-4
    assert load_tokenizer(out).convert_tokens_to_ids("|<MASK>|") == special_token_ids()["mask"]
    assert special_tokens(out).stop_token_ids == special_tokens(src).stop_token_ids
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp dirs left


def test_save_official_layout(qwen2_ckpt, official_ckpt, tmp_path):
    model = load_model(qwen2_ckpt)
    mask = special_token_ids()["mask"]
    cfg = replace(model.config, bd_size=32, mask_token_id=mask)
    out = save_checkpoint(tmp_path / "out", model, config=cfg, official_layout=True,
                          tokenizer=load_tokenizer(qwen2_ckpt))
    raw = read_config_json(out)
    assert raw["model_type"] == "Fast_dLLM_Qwen"
    assert raw["architectures"] == ["Fast_dLLM_QwenForCausalLM"]
    assert raw["bd_size"] == 32 and raw["mask_token_id"] == mask
    assert "auto_map" not in raw and not list(out.glob("*.py"))
    reloaded = load_model(out)
    assert reloaded.config.bd_size == 32 and reloaded.config.mask_token_id == mask
    assert torch.equal(logits(reloaded), logits(model))

    # an official checkpoint saved back as-is keeps its layout and bd_size
    again = save_checkpoint(tmp_path / "again", load_model(official_ckpt), official_layout=True)
    assert read_config(again)[0].bd_size == 32
    assert read_config_json(again)["model_type"] == "Fast_dLLM_Qwen"


def test_save_bfloat16(qwen2_ckpt, tmp_path):
    model = load_model(qwen2_ckpt)
    out = save_checkpoint(tmp_path / "out", model, dtype=torch.bfloat16)
    assert {t.dtype for t in load_file(str(out / "model.safetensors")).values()} == {torch.bfloat16}
    reloaded = load_model(out, dtype=torch.bfloat16)
    for (name, a), (_, b) in zip(model.state_dict().items(), reloaded.state_dict().items()):
        assert torch.equal(a.to(torch.bfloat16), b), name


def _failing_save_file(*args, **kwargs):
    raise OSError("No space left on device")


class _FailingTokenizer:
    """Writes part of its files, then fails: a crash after the weights were written."""

    def save_pretrained(self, path):
        Path(path, "tokenizer.json").write_text("{")
        raise OSError("disk full")


def test_save_is_atomic_for_a_new_directory(qwen2_ckpt, tmp_path, monkeypatch):
    model = load_model(qwen2_ckpt)
    monkeypatch.setattr(checkpoint_mod, "save_file", _failing_save_file)
    with pytest.raises(OSError, match="No space"):
        save_checkpoint(tmp_path / "out", model)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path / "out", model, tokenizer=_FailingTokenizer())
    assert list(tmp_path.iterdir()) == []


def test_save_failure_keeps_old_checkpoint(qwen2_ckpt, checkpoint_factory, tmp_path, monkeypatch):
    old_model = load_model(qwen2_ckpt)
    out = save_checkpoint(tmp_path / "out", old_model, tokenizer=load_tokenizer(qwen2_ckpt))
    before = dir_listing(out)
    new_model = load_model(checkpoint_factory("qwen2", seed=1))

    with monkeypatch.context() as m:
        m.setattr(checkpoint_mod, "save_file", _failing_save_file)
        with pytest.raises(OSError):
            save_checkpoint(out, new_model)
    with pytest.raises(OSError):
        save_checkpoint(out, new_model, tokenizer=_FailingTokenizer())
    assert dir_listing(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert torch.equal(logits(load_model(out)), logits(old_model))

    # a successful save replaces the old checkpoint completely
    save_checkpoint(out, new_model)
    assert torch.equal(logits(load_model(out)), logits(new_model))
    assert not (out / "tokenizer.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# ---------------------------------------------------------------- load peak (issue 20, defect 7)
def _allocated_peak(fn) -> int:
    """Peak bytes held by torch's CPU allocator while `fn` runs (the profiler reports every
    allocation and free; the sum in time order is what is held)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    held = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        held += event.self_cpu_memory_usage
        peak = max(peak, held)
    return peak


def test_loading_allocates_the_weights_once_in_the_target_dtype(tmp_path):
    """Issue 20, defect 7: a float32 checkpoint loaded as bf16 must not hold a float32 copy of the
    model (on a GPU: ~3x the bf16 weights); the peak is the bf16 weights plus a few tensors in flight. One tensor a file, so that the file safetensors
    maps while reading is one tensor too (the shipped AR model, ~2.8M parameters)."""
    shipped = load_model(REPO_ROOT / "models" / "fastdllm-wp-ar", "cpu", torch.float32)
    out = tmp_path / "fp32"
    shutil.copytree(REPO_ROOT / "models" / "fastdllm-wp-ar", out, ignore=shutil.ignore_patterns("*.safetensors"))
    weight_map = {}
    for i, (name, tensor) in enumerate(shipped.hf_tensors().items()):
        weight_map[name] = f"part-{i:03d}.safetensors"
        save_file({name: tensor.contiguous().clone()}, str(out / weight_map[name]))
    (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    largest = max(t.numel() * 4 for t in shipped.hf_tensors().values())
    bf16 = shipped.num_parameters() * 2
    del shipped

    loaded = []
    peak = _allocated_peak(lambda: loaded.append(load_model(out, "cpu", torch.bfloat16)))
    assert next(loaded[0].parameters()).dtype == torch.bfloat16
    assert peak <= bf16 + 3 * largest, (peak, bf16, largest)
