"""Checkpoints on disk: find them, load them, write them.

A checkpoint is a Hugging Face model directory: config.json, *.safetensors (one file, or shards
with model.safetensors.index.json), optional generation_config.json and tokenizer files.
Weights are read from safetensors only and code named by `auto_map` is never imported or run.
Hub ids are resolved to a local snapshot with huggingface_hub (only when the argument is not an
existing directory). Writing is atomic: files go to a temporary sibling directory that is
renamed into place, so a crash never leaves a half-written checkpoint behind.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..atomic import atomic_dir
from ..errors import FastDLLMError
from .config import ModelConfig
from .transformer import Transformer
from .weights import TensorInfo, check_finite, check_fits, check_tensors, confined

MASK_TOKEN = "|<MASK>|"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                    "tokenizer.model", "special_tokens_map.json", "added_tokens.json",
                    "chat_template.jinja", "chat_template.json")


def resolve_model_dir(name_or_path: str | os.PathLike) -> Path:
    """A local directory as is; anything else that looks like a hub id is downloaded
    (safetensors, json and tokenizer files only; never *.py or pickles)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    text = str(name_or_path)
    if path.exists():
        raise FastDLLMError(f"model {text!r} is a file; pass the checkpoint directory that holds config.json",
                            field="model")
    looks_like_hub_id = text.count("/") == 1 and not text.startswith((".", "/", "~"))
    if not looks_like_hub_id:
        raise FastDLLMError(
            f"model directory {text!r} does not exist; pass a directory with config.json and "
            "*.safetensors, or a Hugging Face hub id such as Efficient-Large-Model/Fast_dLLM_v2_1.5B"
        )
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(
            text, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"]
        ))
    except Exception as e:  # network, auth or missing repo: one clear message
        raise FastDLLMError(
            f"could not fetch {text!r} from the Hugging Face hub ({type(e).__name__}: {e}); "
            "check the id and your network, or pass a local directory"
        ) from None


def read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise FastDLLMError(f"{path} is not valid JSON ({e}); re-download or fix the file") from None
    except OSError as e:
        raise FastDLLMError(f"cannot read {path}: {e.strerror}") from None


def read_config(model_dir: Path) -> tuple[ModelConfig, dict[str, Any]]:
    cfg_path = model_dir / "config.json"
    if not cfg_path.is_file():
        raise FastDLLMError(f"{model_dir} has no config.json; is this a Hugging Face model directory?")
    raw = read_json(confined(cfg_path, model_dir, "the file"))
    if not isinstance(raw, dict):
        raise FastDLLMError(f"{cfg_path} must hold a JSON object, got {type(raw).__name__}")
    return ModelConfig.from_hf(raw), raw


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files, each confined to the checkpoint (no `../`, no symlink out)."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(confined(index, model_dir, "the index")).get("weight_map", {})
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise FastDLLMError(f"{index}: weight_map must map tensor names to shard file names")
        shards = sorted(set(weight_map.values()))
        for s in shards:
            confined(model_dir / s, model_dir, "the index names the shard")
        missing = [s for s in shards if not (model_dir / s).is_file()]
        if missing:
            raise FastDLLMError(f"{model_dir}: shards listed in the index are missing: {missing}")
        return [model_dir / s for s in shards]
    files = sorted(model_dir.glob("*.safetensors"))
    if files:
        return [confined(f, model_dir, "the weights file") for f in files]
    if any(model_dir.glob("*.bin")) or any(model_dir.glob("*.pt")) or any(model_dir.glob("*.pth")):
        raise FastDLLMError(
            f"{model_dir} holds only pickle weights (*.bin/*.pt); fastdllm loads safetensors only "
            "for safety. Convert them once with transformers (save_pretrained(safe_serialization=True))"
        )
    raise FastDLLMError(f"{model_dir} has no *.safetensors weight files")


def load_weights(model: Transformer, found: dict[str, TensorInfo], device: torch.device,
                 dtype: torch.dtype) -> None:
    """Copy the tensors `found` (checked headers, see `weights.check_tensors`) into the model,
    by Hugging Face name (into the rows of a fused matrix where the model fuses), checking each
    for NaN and infinity as it is read."""
    targets = model.hf_targets()
    by_file: dict[Path, list[str]] = {}
    for name, info in found.items():
        by_file.setdefault(info.file, []).append(name)
    for file, names in by_file.items():
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for name in names:
                    tensor = f.get_tensor(name)
                    check_finite(name, tensor, file)
                    param, rows = targets[name]
                    param.data[rows].copy_(tensor.to(device=device, dtype=dtype))
        except FastDLLMError:
            raise
        except (OSError, RuntimeError, ValueError) as e:  # what the header check cannot see
            raise FastDLLMError(f"{file.name} could not be read ({type(e).__name__}: {e}); "
                                "re-download or re-save the checkpoint") from None


def load_model(model_dir: Path, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32) -> Transformer:
    """Validate, then allocate: config bounds, the parameter bytes against the device's free
    memory, every file's location and every safetensors header against the model's shapes;
    only then is the model allocated, in `dtype` (never in float32 first), and the weights
    read one tensor at a time."""
    cfg, _ = read_config(model_dir)
    device = torch.device(device)
    check_fits(cfg.num_parameters(), dtype, device)
    with torch.device("meta"):  # shapes only, nothing allocated
        model = Transformer(cfg)
    skip = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
    # Hugging Face names and shapes (the rows of a fused matrix are a tensor of their own)
    found = check_tensors(weight_files(model_dir),
                          {n: tuple(p[rows].shape) for n, (p, rows) in model.hf_targets().items()},
                          skip=skip)
    # the dtype is set on the meta model, so the device memory is allocated once, in the target
    # dtype: converting after to_empty held the float32 copy and the converted one at once
    model = model.to(dtype).to_empty(device=device)
    if cfg.tie_word_embeddings:  # to_empty breaks the tie
        model.lm_head.weight = model.model.embed_tokens.weight
    load_weights(model, found, device, dtype)
    return model.eval()


def load_tokenizer(model_dir: Path):
    """The checkpoint's tokenizer through transformers (never with remote code), or None when
    the directory has no tokenizer files (token-id prompts still work)."""
    if not any((model_dir / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        return None
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    # transformers reads config.json too and warns that it does not know model_type
    # Fast_dLLM_Qwen; the tokenizer itself is standard, so that warning is noise for our users
    for name in _TOKENIZER_FILES:
        if (model_dir / name).exists():
            confined(model_dir / name, model_dir, "the tokenizer file")
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False)
    except Exception as e:
        if (model_dir / "tokenizer.json").is_file():
            # a custom tokenizer class (`auto_map`, remote code) over a standard tokenizer.json:
            # load the tokenizer.json itself, never the code
            from transformers import PreTrainedTokenizerFast

            try:
                return PreTrainedTokenizerFast.from_pretrained(str(model_dir))
            except Exception:
                pass
        if "trust_remote_code" in str(e) or "auto_map" in str(e):
            raise FastDLLMError(
                f"{model_dir}: the tokenizer is defined by Python code shipped with the checkpoint "
                "(auto_map in tokenizer_config.json), which fastdllm never runs; add a standard "
                "tokenizer.json to the checkpoint") from None
        raise FastDLLMError(f"{model_dir}: the tokenizer files could not be loaded "
                            f"({type(e).__name__}: {e})") from None
    finally:
        hf_logging.set_verbosity(level)


@dataclass(frozen=True)
class SpecialTokens:
    mask_token_id: int | None
    stop_token_ids: tuple[int, ...]


def resolve_special_tokens(cfg: ModelConfig, model_dir: Path, tokenizer,
                           mask_token_id: int | None = None,
                           stop_token_ids: tuple[int, ...] | None = None) -> SpecialTokens:
    """Mask id: explicit, else config.json `mask_token_id`, else the tokenizer's `|<MASK>|`.
    Stop ids: explicit, else generation_config.json / config.json `eos_token_id`, else the
    tokenizer's eos."""
    if mask_token_id is None:
        mask_token_id = cfg.mask_token_id
    if mask_token_id is None and tokenizer is not None:
        tid = tokenizer.convert_tokens_to_ids(MASK_TOKEN)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id:
            mask_token_id = tid
    if mask_token_id is not None and not 0 <= mask_token_id < cfg.vocab_size:
        raise FastDLLMError(
            f"mask token id {mask_token_id} is outside the vocabulary (0..{cfg.vocab_size - 1}); "
            "pass the id of the checkpoint's |<MASK>| token", field="mask_token_id")
    if stop_token_ids is None:
        gen = model_dir / "generation_config.json"
        eos = read_json(gen).get("eos_token_id") if gen.is_file() else None
        if eos is not None:
            stop_token_ids = tuple(eos) if isinstance(eos, list) else (int(eos),)
        elif cfg.eos_token_ids:
            stop_token_ids = cfg.eos_token_ids
        elif tokenizer is not None and tokenizer.eos_token_id is not None:
            stop_token_ids = (int(tokenizer.eos_token_id),)
        else:
            stop_token_ids = ()
    for s in stop_token_ids:
        if not 0 <= s < cfg.vocab_size:
            raise FastDLLMError(f"stop token id {s} is outside the vocabulary (0..{cfg.vocab_size - 1})",
                                field="stop_token_id")
    return SpecialTokens(mask_token_id, tuple(int(s) for s in stop_token_ids))


def save_checkpoint(out_dir: str | os.PathLike, model: Transformer, *, tokenizer=None,
                    config: ModelConfig | None = None, official_layout: bool = False,
                    generation_config: dict[str, Any] | None = None,
                    extra_files: dict[str, str] | None = None,
                    dtype: torch.dtype | None = None) -> Path:
    """Write a checkpoint directory atomically (temp dir, then rename over any old one).

    `extra_files` maps file names to text (e.g. a training summary or model card)."""
    out = Path(out_dir)
    with atomic_dir(out) as tmp:
        write_checkpoint_files(tmp, model, tokenizer=tokenizer, config=config,
                               official_layout=official_layout, generation_config=generation_config,
                               extra_files=extra_files, dtype=dtype)
    return out


def write_checkpoint_files(directory: Path, model: Transformer, *, tokenizer=None,
                           config: ModelConfig | None = None, official_layout: bool = False,
                           generation_config: dict[str, Any] | None = None,
                           extra_files: dict[str, str] | None = None,
                           dtype: torch.dtype | None = None) -> None:
    """The files of a checkpoint, written into an existing (staging) directory; callers that
    add files of their own (training checkpoints) make it atomic with `atomic_dir`."""
    cfg = config or model.config
    state = {}
    # Hugging Face names; a copy each, as the row views of a fused matrix share its storage
    for name, tensor in model.hf_tensors().items():
        state[name] = tensor.to("cpu", dtype or tensor.dtype, copy=True).contiguous()
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    hf = cfg.to_hf(official_layout=official_layout)
    hf["torch_dtype"] = hf["dtype"] = str(dtype or next(model.parameters()).dtype).replace("torch.", "")
    (directory / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    gen = dict(generation_config or {})
    if cfg.eos_token_ids and "eos_token_id" not in gen:
        gen["eos_token_id"] = list(cfg.eos_token_ids)
    if cfg.bos_token_id is not None:
        gen.setdefault("bos_token_id", cfg.bos_token_id)
    (directory / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(str(directory))
    for name, text in (extra_files or {}).items():
        (directory / name).write_text(text)
