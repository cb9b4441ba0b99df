"""What training starts from: a pretrained checkpoint, a from-scratch architecture, or (on
resume) the latest training checkpoint; with its tokenizer and generation config.

For the diffusion objective the [MASK] token is added (mask_token.py) and `bd_size` set, so
every checkpoint written from here on is loadable by the block-diffusion engine.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn

from ..errors import FastDLLMError
from ..model.checkpoint import load_model, load_tokenizer, read_json, resolve_model_dir
from ..model.config import FAMILY_FLAGS, ModelConfig, RopeConfig
from ..model.transformer import Transformer
from ..rounding import round_up
from .config import TrainConfig
from .mask_token import add_mask_token, add_to_tokenizer


def _tokenizer(directory: Path, what: str):
    if not directory.is_dir():
        raise FastDLLMError(f"{what} {str(directory)!r} does not exist; pass a directory with "
                            "tokenizer files", field="tokenizer")
    tokenizer = load_tokenizer(directory)
    if tokenizer is None:
        raise FastDLLMError(f"{what} {str(directory)!r} has no tokenizer files (tokenizer.json / "
                            "tokenizer_config.json); training needs a tokenizer", field="tokenizer")
    return tokenizer


def _generation_config(directory: Path) -> dict:
    path = directory / "generation_config.json"
    gen = read_json(path) if path.is_file() else {}
    return {k: v for k, v in gen.items() if k != "transformers_version"}


def scratch_model(cfg: TrainConfig, tokenizer) -> Transformer:
    """A freshly initialised model of the `model` section (weights ~ N(0, init_std), biases 0,
    norms 1, as Hugging Face initialises Llama-family models)."""
    arch = cfg.model
    qkv_bias, qk_norm = FAMILY_FLAGS[arch.architecture]
    eos = tokenizer.eos_token_id
    mc = ModelConfig(
        vocab_size=round_up(len(tokenizer), cfg.pad_vocab_to_multiple_of),
        hidden_size=arch.hidden_size,
        intermediate_size=arch.intermediate_size,
        num_layers=arch.num_layers,
        num_heads=arch.num_heads,
        num_kv_heads=arch.num_kv_heads or arch.num_heads,
        head_dim=arch.head_dim or arch.hidden_size // arch.num_heads,
        rms_norm_eps=arch.rms_norm_eps,
        rope=RopeConfig(theta=arch.rope_theta),
        max_position_embeddings=arch.max_position_embeddings,
        qkv_bias=qkv_bias,
        qk_norm=qk_norm,
        tie_word_embeddings=arch.tie_word_embeddings,
        model_type=arch.architecture,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_ids=(eos,) if eos is not None else (),
    )
    model = Transformer(mc)
    generator = torch.Generator().manual_seed(cfg.train.seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.normal_(0.0, arch.init_std, generator=generator)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
    return model


def initial_model(cfg: TrainConfig) -> tuple[Transformer, object, dict]:
    """(model in float32 on CPU, tokenizer, generation config) to start a run from."""
    if cfg.init_from == "scratch":
        tokenizer = _tokenizer(Path(cfg.tokenizer), "tokenizer")
        if cfg.objective == "diffusion":
            add_to_tokenizer(tokenizer)  # before sizing the vocabulary, so no growth is needed
        model = scratch_model(cfg, tokenizer)
        gen = {"bos_token_id": tokenizer.bos_token_id} if tokenizer.bos_token_id is not None else {}
    else:
        looks_like_hub_id = cfg.base_model.count("/") == 1 and not cfg.base_model.startswith((".", "/", "~"))
        if not Path(cfg.base_model).expanduser().exists() and not looks_like_hub_id:
            raise FastDLLMError(f"base_model {cfg.base_model!r} does not exist; pass a checkpoint "
                                "directory with config.json and *.safetensors", field="base_model")
        base = resolve_model_dir(cfg.base_model)
        model = load_model(base, "cpu", torch.float32)
        tokenizer = _tokenizer(Path(cfg.tokenizer) if cfg.tokenizer else base,
                               "tokenizer" if cfg.tokenizer else "base_model")
        gen = _generation_config(base)
    if cfg.official_layout and model.config.model_type.lower() not in ("qwen2", "fast_dllm_qwen"):
        raise FastDLLMError(
            f"official_layout writes the Fast_dLLM_Qwen layout, which exists for Qwen2 models only; "
            f"this model is {model.config.model_type!r}. Set official_layout: false", field="official_layout")
    if cfg.objective == "diffusion":
        add_mask_token(model, tokenizer, cfg.pad_vocab_to_multiple_of)
        model.config = dataclasses.replace(model.config, bd_size=cfg.diffusion.block_size,
                                           token_shift=cfg.diffusion.token_shift)
    if model.config.max_position_embeddings < cfg.data.seq_len:
        model.config = dataclasses.replace(model.config, max_position_embeddings=cfg.data.seq_len)
    return model.train(), tokenizer, gen


def resumed_model(checkpoint: Path) -> tuple[Transformer, object, dict]:
    """Model, tokenizer and generation config exactly as a training checkpoint saved them."""
    return load_model(checkpoint, "cpu", torch.float32).train(), load_tokenizer(checkpoint), \
        _generation_config(checkpoint)
