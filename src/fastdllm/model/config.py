"""Model configuration: one frozen dataclass for the whole Llama family.

`ModelConfig.from_hf` reads a Hugging Face `config.json` dict (qwen2, llama, qwen3 and the
official Fast_dLLM_Qwen layout) into architecture flags, so one decoder implementation serves
every supported family (STYLE.md principle 9). Remote code named by `auto_map` is ignored.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import FastDLLMError

# model_type -> (q/k/v bias default, per-head q/k RMSNorm)
FAMILY_FLAGS: dict[str, tuple[bool, bool]] = {
    "qwen2": (True, False),
    "fast_dllm_qwen": (True, False),  # official Fast-dLLM v2 checkpoints: Qwen2 weights
    "llama": (False, False),
    "qwen3": (False, True),
}
SUPPORTED_MODEL_TYPES = ("qwen2", "llama", "qwen3", "Fast_dLLM_Qwen")
# Sanity bounds on config.json (several times the largest published models), so that a garbled
# or hostile config is refused before anything is allocated from it.
MAX_VOCAB = 1 << 22
MAX_WIDTH = 1 << 16  # hidden_size
MAX_INTERMEDIATE = 1 << 18
MAX_LAYERS = 1024
MAX_HEADS = 1024
MAX_HEAD_DIM = 4096
MAX_POSITIONS = 1 << 24


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters; `kind` is 'default', 'linear' or 'llama3'."""

    theta: float = 10000.0
    kind: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self):
        if self.kind not in ("default", "linear", "llama3"):
            raise FastDLLMError(
                f"unsupported RoPE scaling type {self.kind!r}; fastdllm supports "
                "'default', 'linear' and 'llama3'"
            )


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = field(default_factory=RopeConfig)
    max_position_embeddings: int = 4096
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    tie_word_embeddings: bool = False
    model_type: str = "qwen2"
    # Fast-dLLM v2 extras (None when the checkpoint is a plain AR model).
    bd_size: int | None = None
    mask_token_id: int | None = None
    token_shift: bool = True  # False only for models adapted without token shift (an ablation)
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                     "num_heads", "num_kv_heads", "head_dim"):
            if getattr(self, name) <= 0:
                raise FastDLLMError(f"config.json: {name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise FastDLLMError(
                f"config.json: num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )
        if self.mask_token_id is not None and not 0 <= self.mask_token_id < self.vocab_size:
            raise FastDLLMError(
                f"config.json: mask_token_id {self.mask_token_id} is outside the vocabulary "
                f"(size {self.vocab_size})"
            )

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> "ModelConfig":
        """Build from a Hugging Face config.json dict."""
        model_type = str(cfg.get("model_type", ""))
        family = FAMILY_FLAGS.get(model_type.lower())
        if family is None:
            raise FastDLLMError(
                f"unsupported architecture: config.json has model_type {model_type!r}; "
                f"fastdllm supports {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        qkv_bias_default, qk_norm = family
        if cfg.get("use_sliding_window"):
            raise FastDLLMError(
                "config.json enables use_sliding_window, which fastdllm does not implement; "
                "set it to false (all published Qwen2.5 checkpoints ship it disabled)"
            )
        hidden = _int(cfg, "hidden_size")
        heads = _int(cfg, "num_attention_heads", hi=MAX_HEADS)
        attention_bias = cfg.get("attention_bias")
        if model_type.lower() in ("qwen2", "fast_dllm_qwen"):
            qkv_bias, o_bias = True, False
        else:
            qkv_bias = bool(attention_bias) if attention_bias is not None else qkv_bias_default
            o_bias = qkv_bias
        vocab = _int(cfg, "vocab_size", hi=MAX_VOCAB)
        eos = cfg.get("eos_token_id")
        eos_ids = eos if isinstance(eos, list) else ([eos] if eos is not None else [])
        return cls(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=_int(cfg, "intermediate_size", hi=MAX_INTERMEDIATE),
            num_layers=_int(cfg, "num_hidden_layers", hi=MAX_LAYERS),
            num_heads=heads,
            num_kv_heads=_int(cfg, "num_key_value_heads", hi=MAX_HEADS, default=heads),
            head_dim=_int(cfg, "head_dim", hi=MAX_HEAD_DIM, default=hidden // heads),
            rms_norm_eps=_real(cfg, "rms_norm_eps", 1e-6, lo=0.0, hi=1.0),
            rope=_rope_from_hf(cfg),
            max_position_embeddings=_int(cfg, "max_position_embeddings", hi=MAX_POSITIONS,
                                         default=4096),
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            qk_norm=qk_norm,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            model_type=model_type,
            bd_size=_int(cfg, "bd_size", hi=4096, default=None) if cfg.get("bd_size") else None,
            mask_token_id=_token_id(cfg.get("mask_token_id"), "mask_token_id", vocab),
            token_shift=bool(cfg.get("token_shift", True)),
            bos_token_id=_token_id(cfg.get("bos_token_id"), "bos_token_id", vocab),
            eos_token_ids=tuple(_token_id(e, "eos_token_id", vocab) for e in eos_ids),
        )

    def num_parameters(self) -> int:
        """Parameters the model will allocate (from the dimensions alone, before loading)."""
        h, kv = self.hidden_size, self.num_kv_heads * self.head_dim
        q = self.num_heads * self.head_dim
        attention = h * q + 2 * h * kv + q * h + (q + 2 * kv if self.qkv_bias else 0) \
            + (h if self.o_bias else 0) + (2 * self.head_dim if self.qk_norm else 0)
        mlp = 3 * h * self.intermediate_size + (2 * self.intermediate_size + h if self.mlp_bias else 0)
        per_layer = attention + mlp + 2 * h
        heads = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * per_layer + heads + h

    def to_hf(self, *, official_layout: bool = False) -> dict[str, Any]:
        """A config.json dict that transformers (and fastdllm) load back to this config."""
        model_type = self.model_type
        if official_layout:
            if model_type.lower() not in ("qwen2", "fast_dllm_qwen"):
                raise FastDLLMError(
                    f"the official Fast_dLLM_v2 layout holds Qwen2 weights only; this model is "
                    f"{model_type!r}: save it without official_layout")
            model_type = "Fast_dLLM_Qwen"
        elif model_type == "Fast_dLLM_Qwen":
            model_type = "qwen2"
        arch = {
            "qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM",
            "qwen3": "Qwen3ForCausalLM", "Fast_dLLM_Qwen": "Fast_dLLM_QwenForCausalLM",
        }[model_type]
        rope: dict[str, Any] = {"rope_theta": self.rope.theta, "rope_type": self.rope.kind}
        if self.rope.kind != "default":
            rope["factor"] = self.rope.factor
        if self.rope.kind == "llama3":
            rope.update(
                low_freq_factor=self.rope.low_freq_factor,
                high_freq_factor=self.rope.high_freq_factor,
                original_max_position_embeddings=self.rope.original_max_position_embeddings,
            )
        out: dict[str, Any] = {
            "architectures": [arch],
            "model_type": model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "rope_theta": self.rope.theta,
            "rope_parameters": rope,
            "tie_word_embeddings": self.tie_word_embeddings,
            "use_sliding_window": False,
        }
        if model_type in ("llama", "qwen3"):
            out["attention_bias"] = self.qkv_bias
            out["mlp_bias"] = self.mlp_bias
        if self.bos_token_id is not None:
            out["bos_token_id"] = self.bos_token_id
        if self.eos_token_ids:
            out["eos_token_id"] = (
                self.eos_token_ids[0] if len(self.eos_token_ids) == 1 else list(self.eos_token_ids)
            )
        if self.bd_size is not None:
            out["bd_size"] = self.bd_size
        if self.mask_token_id is not None:
            out["mask_token_id"] = self.mask_token_id
        if not self.token_shift:
            out["token_shift"] = False
        return out


_MISSING = object()


def _int(cfg: dict[str, Any], key: str, *, hi: int = MAX_WIDTH, default: Any = _MISSING) -> int:
    """config.json's integer `key`, in [1, hi]: a clear error for a string, a bool, a float
    with a fraction or an absurd size, before anything is allocated from it."""
    value = cfg.get(key)
    if value is None:
        if default is _MISSING:
            raise FastDLLMError(f"config.json is missing the required key {key!r}")
        return default
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise FastDLLMError(f"config.json: {key} must be an integer, got {value!r}")
    if not 1 <= value <= hi:
        raise FastDLLMError(f"config.json: {key} must be in [1, {hi:,}], got {value:,}")
    return value


def _real(cfg: dict[str, Any], key: str, default: float, *, lo: float, hi: float) -> float:
    value = cfg.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo < value < hi:
        raise FastDLLMError(f"config.json: {key} must be a number in ({lo:g}, {hi:g}), got {value!r}")
    return float(value)


def _token_id(value: Any, key: str, vocab: int) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < vocab:
        raise FastDLLMError(f"config.json: {key} must be a token id in [0, {vocab - 1}], got {value!r}")
    return value


def _rope_from_hf(cfg: dict[str, Any]) -> RopeConfig:
    """Read RoPE from either spelling: transformers 5 `rope_parameters` or 4.x `rope_theta` +
    `rope_scaling` (published Qwen2.5 and Llama-3 configs use the latter)."""
    params = dict(cfg.get("rope_parameters") or {})
    scaling = dict(cfg.get("rope_scaling") or {})
    merged = {**scaling, **params}
    theta = merged.get("rope_theta", cfg.get("rope_theta", 10000.0))
    kind = merged.get("rope_type", merged.get("type", "default")) or "default"
    if not isinstance(kind, str):
        raise FastDLLMError(f"config.json: rope_type must be a string, got {kind!r}")
    kw: dict[str, Any] = {"theta": _real({"rope_theta": theta}, "rope_theta", 1e4, lo=0.0, hi=1e12),
                          "kind": kind}
    for key in ("factor", "low_freq_factor", "high_freq_factor"):
        if key in merged:
            kw[key] = _real(merged, key, 1.0, lo=0.0, hi=1e6)
    if "original_max_position_embeddings" in merged:
        kw["original_max_position_embeddings"] = _int(merged, "original_max_position_embeddings",
                                                      hi=MAX_POSITIONS)
    return RopeConfig(**kw)
