"""End-to-end training runs on CPU: adaptation of a real pretrained Llama (stories260K) into a
block-diffusion model that the engine decodes, exact resume, the AR objective from scratch, the
official output layout, and a clear FastDLLMError for every kind of bad input."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from fastdllm.model.checkpoint import load_model
from fixtures import special_token_ids
from fastdllm.errors import FastDLLMError
from fastdllm.training import run_training
from fastdllm.training import state as state_module
from fastdllm.training.state import latest_checkpoint

QA = [("Q: What color is the sky?\nA:", "The sky is blue."),
      ("Q: What does a cat say?\nA:", "A cat says meow."),
      ("Q: What does a dog say?\nA:", "A dog says woof."),
      ("Q: Where do fish live?\nA:", "Fish live in water."),
      ("Q: What color is grass?\nA:", "Grass is green."),
      ("Q: What is hot?\nA:", "The sun is hot."),
      ("Q: What do birds do?\nA:", "Birds fly in the sky."),
      ("Q: What is cold?\nA:", "Snow is cold.")]

CHATS = [[{"role": "user", "content": f"What is {a} plus {b}?"},
          {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}] for a, b in
         [(1, 2), (2, 2), (3, 4), (5, 1), (6, 2), (7, 0), (4, 4), (2, 5)]]


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def write_config(path: Path, cfg: dict) -> str:
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def tiny_run_config(tmp_path: Path, base: Path, name: str = "run", **sections) -> dict:
    """A few-step diffusion run on the tiny Qwen2 test checkpoint (chat data)."""
    data = write_jsonl(tmp_path / "chats.jsonl", [{"messages": m} for m in CHATS])
    cfg = {"base_model": str(base), "output_dir": str(tmp_path / name),
           "data": {"train_file": str(data), "seq_len": 64},
           "diffusion": {"block_size": 16},
           "optimizer": {"lr": 1e-3, "warmup_steps": 2},
           "train": {"micro_batch_size": 1, "grad_accum_steps": 2, "max_steps": 2, "log_interval": 1}}
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    return cfg


# ---- adaptation, decoded by the engine ----

def test_adapting_stories260k_learns_answers_the_engine_decodes(tmp_path, stories260k_dir):
    data = write_jsonl(tmp_path / "qa.jsonl", [{"prompt": p, "response": r} for p, r in QA])
    cfg = {"base_model": str(stories260k_dir), "output_dir": str(tmp_path / "run"),
           "data": {"train_file": str(data), "val_file": str(data), "seq_len": 64},
           "diffusion": {"block_size": 16},
           "optimizer": {"lr": 5e-3, "warmup_steps": 10},
           "train": {"micro_batch_size": 2, "max_steps": 100, "log_interval": 10, "eval_interval": 1000}}
    final = run_training(write_config(tmp_path / "adapt.yaml", cfg), resume=False)
    assert final == tmp_path / "run" / "final"

    records = metrics(tmp_path / "run")
    val = [r["val_loss"] for r in records if "val_loss" in r]
    assert len(val) == 2 and val[-1] < 0.5 * val[0]  # validated at the start and at the end
    train = [r["loss"] for r in records if "loss" in r]
    assert train[-1] < 0.5 * train[0]
    assert all(r["tokens_per_s"] > 0 for r in records if "loss" in r)

    config = json.loads((final / "config.json").read_text())
    assert config["bd_size"] == 16 and config["mask_token_id"] == 512  # |<MASK>| added: vocab grew
    assert config["vocab_size"] == 576  # 513 rounded up to a multiple of 64
    summary = json.loads((final / "training_summary.json").read_text())
    assert summary["steps"] == 100 and summary["final_val_loss"] == pytest.approx(val[-1])
    assert summary["tokens_seen"] == 100 * 2 * 64

    from fastdllm.llm import LLM

    llm = LLM.load(final, device="cpu")
    tok = llm.tokenizer
    correct = 0
    for prompt, response in QA:
        out = llm.generate(prompt, max_new_tokens=16, threshold=0.9)
        expected = tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        correct += out.token_ids == expected
    assert correct >= 7, f"only {correct}/8 trained answers decoded back"


# ---- resume ----

def test_resume_continues_bitwise(tmp_path, qwen2_ckpt):
    sections = dict(train={"max_steps": 6, "save_interval": 3, "keep_last_k": 1},
                    data={"val_fraction": 0.25})
    straight = tiny_run_config(tmp_path, qwen2_ckpt, "straight", **sections)
    run_training(write_config(tmp_path / "a.yaml", straight))
    resumed = tiny_run_config(tmp_path, qwen2_ckpt, "resumed", **sections)
    path = write_config(tmp_path / "b.yaml", resumed)
    # interrupted after step 4: the step-3 checkpoint is the latest, step 4 is lost
    run_training(path, stop_after_steps=4)
    assert latest_checkpoint(tmp_path / "resumed" / "checkpoints").name == "step-000003"
    assert not (tmp_path / "resumed" / "final").exists()
    run_training(path, resume=True)

    a = load_file(str(tmp_path / "straight" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "final" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    losses = lambda run: [(r["step"], r["loss"]) for r in metrics(tmp_path / run) if "loss" in r]
    assert losses("straight") == losses("resumed")  # step 4 logged once, with the same value

    # only the newest checkpoint is kept; it is a complete, engine-loadable model directory
    ckpts = sorted(p.name for p in (tmp_path / "resumed" / "checkpoints").iterdir())
    assert ckpts == ["step-000006"]
    ckpt = tmp_path / "resumed" / "checkpoints" / "step-000006"
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                 "trainer_state/state.json", "trainer_state/tensors.safetensors"):
        assert (ckpt / name).is_file(), name
    config = json.loads((ckpt / "config.json").read_text())
    # the test tokenizer already has |<MASK>|: its id is used and the vocabulary does not grow
    assert config["bd_size"] == 16 and config["mask_token_id"] == special_token_ids()["mask"]
    assert config["vocab_size"] == json.loads((qwen2_ckpt / "config.json").read_text())["vocab_size"]
    assert torch.equal(load_model(ckpt).model.embed_tokens.weight, b["model.embed_tokens.weight"])
    state = json.loads((ckpt / "trainer_state" / "state.json").read_text())
    assert state["step"] == 6 and state["world_size"] == 1


# ---- AR objective, from scratch ----

def test_ar_pretraining_from_scratch(tmp_path, qwen2_ckpt):
    texts = ["Once upon a time there was a little girl named Lily.",
             "She liked to play outside in the sun with her dog.",
             "One day, Lily found a big red ball in the park."]
    data = write_jsonl(tmp_path / "text.jsonl", [{"text": t} for t in texts])
    cfg = {"objective": "ar", "init_from": "scratch", "tokenizer": str(qwen2_ckpt),
           "model": {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
                     "intermediate_size": 128},
           "output_dir": str(tmp_path / "ar"),
           "data": {"train_file": str(data), "seq_len": 128},
           "optimizer": {"lr": 3e-3, "warmup_steps": 5},
           "train": {"micro_batch_size": 1, "max_steps": 60, "log_interval": 5}}
    final = run_training(write_config(tmp_path / "ar.yaml", cfg))
    losses = [r["loss"] for r in metrics(tmp_path / "ar") if "loss" in r]
    assert losses[-1] < 0.5 * losses[0]
    config = json.loads((final / "config.json").read_text())
    assert config["model_type"] == "qwen2" and "mask_token_id" not in config and "bd_size" not in config
    model = load_model(final)
    assert model.config.num_layers == 2 and model.config.qkv_bias


def test_official_layout_output(tmp_path, qwen2_ckpt, official_ckpt, llama_ckpt):
    cfg = tiny_run_config(tmp_path, qwen2_ckpt, official_layout=True, train={"max_steps": 1})
    final = run_training(write_config(tmp_path / "c.yaml", cfg))
    config = json.loads((final / "config.json").read_text())
    assert config["architectures"] == ["Fast_dLLM_QwenForCausalLM"]
    assert config["model_type"] == "Fast_dLLM_Qwen" and config["bd_size"] == 16
    assert load_model(final).config.bd_size == 16
    # an official Fast-dLLM v2 checkpoint can be trained further (its remote code never runs)
    cfg = tiny_run_config(tmp_path, official_ckpt, "from-official", train={"max_steps": 1})
    final = run_training(write_config(tmp_path / "d.yaml", cfg))
    config = json.loads((final / "config.json").read_text())
    assert config["model_type"] == "qwen2" and config["mask_token_id"] == special_token_ids()["mask"]
    cfg = tiny_run_config(tmp_path, llama_ckpt, "llama-official", official_layout=True)
    _expect_error(tmp_path, cfg, "official_layout", "Qwen2 models only")


# ---- bad input ----

def _expect_error(tmp_path, cfg: dict, *needles: str, resume: bool = False) -> FastDLLMError:
    with pytest.raises(FastDLLMError) as info:
        run_training(write_config(tmp_path / "bad.yaml", cfg), resume=resume)
    for needle in needles:
        assert needle in str(info.value), (needle, str(info.value))
    return info.value


def test_missing_base_model(tmp_path, qwen2_ckpt):
    cfg = tiny_run_config(tmp_path, qwen2_ckpt, base_model=str(tmp_path / "no-such-model"))
    _expect_error(tmp_path, cfg, "base_model", "does not exist")


def test_missing_data_file(tmp_path, qwen2_ckpt):
    cfg = tiny_run_config(tmp_path, qwen2_ckpt, data={"train_file": str(tmp_path / "nope.jsonl")})
    _expect_error(tmp_path, cfg, "nope.jsonl", "does not exist")


def test_empty_dataset(tmp_path, qwen2_ckpt):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    cfg = tiny_run_config(tmp_path, qwen2_ckpt, data={"train_file": str(empty)})
    _expect_error(tmp_path, cfg, "no usable examples")


@pytest.mark.parametrize("bad_line, needle", [
    ('{"messages": [', "not valid JSON"),
    ('[1, 2]', "expected a JSON object"),
    ('{"question": "hi"}', "exactly one of"),
    ('{"prompt": "hi"}', "exactly one of"),
    ('{"messages": "hi"}', "'messages' must be"),
])
def test_malformed_jsonl_names_file_and_line(tmp_path, qwen2_ckpt, bad_line, needle):
    lines = [json.dumps({"messages": CHATS[0]}), "", json.dumps({"text": "fine"}), bad_line]
    data = tmp_path / "broken.jsonl"
    data.write_text("\n".join(lines) + "\n")
    cfg = tiny_run_config(tmp_path, qwen2_ckpt, data={"train_file": str(data)})
    _expect_error(tmp_path, cfg, f"{data}:4", needle)


def test_seq_len_not_a_multiple_of_the_block(tmp_path, qwen2_ckpt):
    cfg = tiny_run_config(tmp_path, qwen2_ckpt, data={"seq_len": 60})
    _expect_error(tmp_path, cfg, "data.seq_len (60)", "multiple of diffusion.block_size (16)")


def test_too_long_examples_error_or_truncate(tmp_path, qwen2_ckpt):
    long = tmp_path / "long.jsonl"
    write_jsonl(long, [{"messages": CHATS[0]}, {"text": "a b c d e f g h " * 20}])
    cfg = tiny_run_config(tmp_path, qwen2_ckpt, data={"train_file": str(long), "too_long": "error"})
    _expect_error(tmp_path, cfg, f"{long}:2", "more than data.seq_len=64")
    cfg = tiny_run_config(tmp_path, qwen2_ckpt, data={"train_file": str(long)}, train={"max_steps": 1})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_training(write_config(tmp_path / "trunc.yaml", cfg))
    assert any("truncated 1 of 2 examples" in str(w.message) for w in caught)


@pytest.mark.parametrize("change, needles", [
    ({"learning_rate": 1e-4}, ["unknown config key learning_rate", "valid keys:", "optimizer"]),
    ({"optimizer": {"lrr": 1e-4}}, ["unknown config key optimizer.lrr", "weight_decay"]),
    ({"train": {"max_steps": "ten"}}, ["train.max_steps must be an integer"]),
    ({"diffusion": {"loss_weighting": "1/t"}}, ["diffusion.loss_weighting", "inverse_t"]),
    ({"train": {"max_steps": 5, "max_tokens": 100}}, ["exactly one of train.max_steps"]),
    ({"objective": "mdm"}, ["objective", "diffusion, ar"]),
])
def test_bad_config_keys_and_values(tmp_path, qwen2_ckpt, change, needles):
    cfg = tiny_run_config(tmp_path, qwen2_ckpt, **change)
    _expect_error(tmp_path, cfg, *needles)


def test_config_reads_yaml_exponents_as_numbers(tmp_path, qwen2_ckpt):
    from fastdllm.training import load_train_config

    path = tmp_path / "e.yaml"
    path.write_text(yaml.safe_dump(tiny_run_config(tmp_path, qwen2_ckpt)).replace("lr: 0.001", "lr: 1e-3"))
    assert "1e-3" in path.read_text()
    assert load_train_config(path).optimizer.lr == 1e-3


def test_resume_guards(tmp_path, qwen2_ckpt):
    cfg = tiny_run_config(tmp_path, qwen2_ckpt, train={"max_steps": 2, "save_interval": 1})
    _expect_error(tmp_path, cfg, "nothing to resume", resume=True)
    run_training(write_config(tmp_path / "ok.yaml", cfg), stop_after_steps=1)
    _expect_error(tmp_path, cfg, "already holds checkpoints", "--resume")  # a fresh run must not clobber
    changed = tiny_run_config(tmp_path, qwen2_ckpt, train={"max_steps": 2, "save_interval": 1},
                              optimizer={"lr": 2e-3})
    _expect_error(tmp_path, changed, "different config", "optimizer.lr: 0.001 -> 0.002", resume=True)


def test_incomplete_checkpoints_are_never_used(tmp_path, qwen2_ckpt, monkeypatch):
    cfg = tiny_run_config(tmp_path, qwen2_ckpt, train={"max_steps": 3, "save_interval": 1})
    path = write_config(tmp_path / "ok.yaml", cfg)
    run_training(path, stop_after_steps=1)
    root = tmp_path / "run" / "checkpoints"
    # leftovers of a crash while saving: a staging dir, and a step dir without trainer state
    (root / ".step-000002.tmp-999").mkdir()
    (root / "step-000002").mkdir()
    (root / "step-000002" / "config.json").write_text("{}")
    assert latest_checkpoint(root).name == "step-000001"

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(state_module, "save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        run_training(path, resume=True)
    assert not (root / "step-000003").exists() and latest_checkpoint(root).name == "step-000001"
    assert not list(root.glob(".step-*.tmp-*"))[1:]  # at most the pre-made stale dir (removed next run)
    monkeypatch.undo()
    assert run_training(path, resume=True).name == "final"
    assert not list(root.glob(".step-*.tmp-*"))


def test_example_configs_are_valid():
    from fastdllm.training import load_train_config

    configs = Path(__file__).resolve().parents[1] / "configs"
    adapt = load_train_config(configs / "adapt_example.yaml")
    assert adapt.objective == "diffusion" and adapt.diffusion.block_size == 32
    pretrain = load_train_config(configs / "pretrain_example.yaml")
    assert pretrain.objective == "ar" and pretrain.init_from == "scratch"


# ---- the GPU configuration's parts the CPU can run (issue 20, defect 8) ----

def test_validation_never_runs_flex_attention_uncompiled(tmp_path, qwen2_ckpt):
    """Uncompiled, flex_attention materialises the whole float32 score matrix: a run that trains
    with flex uncompiled validates with block-sparse tiles (diffusion) and the dense mask (AR),
    which compute the same loss."""
    from torch.nn.attention.flex_attention import BlockMask

    from fastdllm.training.config_file import load_train_config
    from fastdllm.training.trainer import Trainer

    cfg = tiny_run_config(tmp_path, qwen2_ckpt, data={"val_fraction": 0.3},
                          train={"attention": "flex", "compile": False})
    trainer = Trainer(load_train_config(write_config(tmp_path / "flex.yaml", cfg)), resume=False)
    assert trainer.use_flex  # training itself runs what it was told
    masks = []
    trainer.acc.unwrap_model(trainer.model).register_forward_pre_hook(lambda m, args: masks.append(args[2]))
    val = trainer.evaluate()
    assert masks and not any(isinstance(m, BlockMask) for m in masks)
    reference = Trainer(load_train_config(write_config(
        tmp_path / "tiles.yaml", tiny_run_config(tmp_path, qwen2_ckpt, "tiles", data={"val_fraction": 0.3},
                                                 train={"attention": "block_sparse"}))), resume=False)
    assert val == reference.evaluate()


def test_adamw_runs_fused_or_foreach_kernels_on_cuda():
    """On CUDA, AdamW updates in fused kernels (plain tensors) or foreach ops (FSDP's shards),
    not in a Python loop over parameters; the CPU keeps its loop."""
    from fastdllm.training.trainer import adamw_kernel

    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert adamw_kernel(cuda, sharded=False) == {"fused": True}
    assert adamw_kernel(cuda, sharded=True) == {"foreach": True}
    assert adamw_kernel(cpu, sharded=False) == {"foreach": False}
    p = torch.nn.Parameter(torch.ones(3))
    assert torch.optim.AdamW([p], **adamw_kernel(cuda, sharded=False)).defaults["fused"] is True
