"""Training configuration: one YAML file, read into frozen dataclasses validated where built.

Sections mirror the recipe (paper §3.2 for the `diffusion` section): what to start from
(top level, `model` for from-scratch architectures), the `data`, the `diffusion` objective,
the `optimizer` with its learning-rate schedule, and the `train` loop. Every key is checked:
an unknown key is an error that names it and lists the valid ones, so a typo never silently
falls back to a default (config_file.py reads and checks the YAML). `TrainConfig.to_dict()` is
the canonical form written into every checkpoint; resuming compares it with the given file.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ..errors import FastDLLMError

OBJECTIVES = ("diffusion", "ar")
INIT_FROM = ("pretrained", "scratch")
ARCHITECTURES = ("qwen2", "llama", "qwen3")


def _choice(value: str, allowed: tuple[str, ...], key: str) -> None:
    if value not in allowed:
        raise FastDLLMError(f"{key}: {value!r} is not one of {', '.join(allowed)}", field=key)


def _positive(value: float, key: str, *, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise FastDLLMError(f"{key} must be {bound}, got {value}", field=key)


@dataclass(frozen=True)
class ScratchModelConfig:
    """Architecture of a model trained from scratch (`init_from: scratch`); Llama family."""

    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    num_kv_heads: int | None = None  # default: num_heads (no GQA)
    head_dim: int | None = None  # default: hidden_size // num_heads
    architecture: str = "qwen2"
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    init_std: float = 0.02

    def __post_init__(self):
        _choice(self.architecture, ARCHITECTURES, "model.architecture")
        for key in ("hidden_size", "num_layers", "num_heads", "intermediate_size",
                    "max_position_embeddings", "rope_theta", "init_std"):
            _positive(getattr(self, key), f"model.{key}")
        if self.num_kv_heads is not None and self.num_heads % self.num_kv_heads:
            raise FastDLLMError(
                f"model.num_heads ({self.num_heads}) must be a multiple of model.num_kv_heads "
                f"({self.num_kv_heads})", field="model.num_kv_heads")
        if self.head_dim is None and self.hidden_size % self.num_heads:
            raise FastDLLMError(
                f"model.hidden_size ({self.hidden_size}) is not divisible by model.num_heads "
                f"({self.num_heads}); set model.head_dim explicitly", field="model.head_dim")


@dataclass(frozen=True)
class DataConfig:
    train_file: str
    val_file: str | None = None
    val_fraction: float = 0.0  # used only without val_file
    seq_len: int = 512  # packed row length (tokens); a multiple of diffusion.block_size
    too_long: str = "truncate"  # truncate | error
    padding: str = "eos"  # eos: pad blocks with loss-bearing EOS; mask: pad with [MASK], no loss
    packing: str = "next_fit"  # next_fit (file order) | first_fit (first-fit decreasing per window)
    num_workers: int = 0  # processes that render and tokenize the files (0: this one)
    cache_dir: str | None = None  # keep tokenized examples here, keyed by file content + tokenizer

    def __post_init__(self):
        _positive(self.seq_len, "data.seq_len")
        _positive(self.num_workers, "data.num_workers", allow_zero=True)
        _choice(self.too_long, ("truncate", "error"), "data.too_long")
        _choice(self.padding, ("eos", "mask"), "data.padding")
        _choice(self.packing, ("next_fit", "first_fit"), "data.packing")
        if not 0.0 <= self.val_fraction < 1.0:
            raise FastDLLMError(f"data.val_fraction must be in [0, 1), got {self.val_fraction}",
                                field="data.val_fraction")
        if self.val_file is not None and self.val_fraction:
            raise FastDLLMError("set data.val_file or data.val_fraction, not both",
                                field="data.val_fraction")


@dataclass(frozen=True)
class DiffusionConfig:
    """Fast-dLLM v2 block-diffusion objective (paper §3.2)."""

    block_size: int = 32
    eps: float = 1e-3  # p = (1 - eps) * t + eps keeps every block's mask probability > 0
    complementary: bool = True
    token_shift: bool = True
    shift_source: str = "clean"  # clean | noisy: which stream predicts a block's first token
    loss_weighting: str = "none"  # none | inverse_t
    # weight of the causal next-token (AR) loss on the clean rows, added to the diffusion loss
    # (paper §3.2: "a weighted combination of the block-diffusion loss and the AR loss"); 0 is
    # the public official recipe. The default, 3, was chosen by measurement on the shipped
    # models' validation split (docs/shipped_models.md). With ar_loss_weight_end the weight
    # moves linearly from ar_loss_weight at the first step to ar_loss_weight_end at the last
    # (schedule.ar_weight_at).
    ar_loss_weight: float = 3.0
    ar_loss_weight_end: float | None = None
    # certainty distillation (training/loss.py `certainty_sums`; off until measured): + weight x
    # mean entropy of the right predictions among the diffusion targets (dParallel's certainty
    # forcing), + weight x mean -log(1 - p_argmax) of the wrong ones (confident mistakes)
    certainty_weight: float = 0.0
    wrong_confidence_weight: float = 0.0
    # uniform: the paper's noise (each token of a block masked with the block's p) | sub_block:
    # the states decoding visits (training/noise.py `sample_sub_block_mask`) | suffix: the states
    # the left-anchored rule visits (`sample_suffix_mask`); both need complementary: false;
    # sub_block_size is decoding's sub-block (engine default 8)
    noise: str = "uniform"
    sub_block_size: int = 8

    def __post_init__(self):
        _positive(self.block_size, "diffusion.block_size")
        _positive(self.certainty_weight, "diffusion.certainty_weight", allow_zero=True)
        _positive(self.wrong_confidence_weight, "diffusion.wrong_confidence_weight", allow_zero=True)
        _positive(self.ar_loss_weight, "diffusion.ar_loss_weight", allow_zero=True)
        _choice(self.noise, ("uniform", "sub_block", "suffix"), "diffusion.noise")
        _positive(self.sub_block_size, "diffusion.sub_block_size")
        if self.noise != "uniform":
            if self.noise == "sub_block" and self.block_size % self.sub_block_size:
                raise FastDLLMError(
                    f"diffusion.sub_block_size ({self.sub_block_size}) must divide diffusion.block_size "
                    f"({self.block_size})", field="diffusion.sub_block_size")
            if self.complementary or self.loss_weighting != "none":
                raise FastDLLMError(
                    f"diffusion.noise: {self.noise} has no complementary twin and no inverse_t weighting; "
                    "set diffusion.complementary: false and diffusion.loss_weighting: none",
                    field="diffusion.noise")
        if self.ar_loss_weight_end is not None:
            _positive(self.ar_loss_weight_end, "diffusion.ar_loss_weight_end", allow_zero=True)
        if not 0.0 <= self.eps < 1.0:
            raise FastDLLMError(f"diffusion.eps must be in [0, 1), got {self.eps}", field="diffusion.eps")
        _choice(self.shift_source, ("clean", "noisy"), "diffusion.shift_source")
        _choice(self.loss_weighting, ("none", "inverse_t"), "diffusion.loss_weighting")


@dataclass(frozen=True)
class OptimizerConfig:
    """AdamW plus the learning-rate schedule `schedule.lr_at` reads."""

    lr: float = 1e-5
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    schedule: str = "cosine"  # cosine | linear | constant (after warmup)
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1  # final lr = lr * min_lr_ratio for cosine / linear

    def __post_init__(self):
        _positive(self.lr, "optimizer.lr")
        _positive(self.weight_decay, "optimizer.weight_decay", allow_zero=True)
        _positive(self.adam_eps, "optimizer.adam_eps")
        _positive(self.grad_clip, "optimizer.grad_clip", allow_zero=True)
        _positive(self.warmup_steps, "optimizer.warmup_steps", allow_zero=True)
        _choice(self.schedule, ("cosine", "linear", "constant"), "optimizer.schedule")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise FastDLLMError(f"optimizer.betas must be two numbers in [0, 1), got {list(self.betas)}",
                                field="optimizer.betas")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise FastDLLMError(f"optimizer.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}",
                                field="optimizer.min_lr_ratio")


@dataclass(frozen=True)
class LoopConfig:
    """The `train` section: batch shape, length of the run, precision and bookkeeping."""

    micro_batch_size: int = 1  # packed rows per process per forward (x2 with complementary twins)
    grad_accum_steps: int = 1
    max_steps: int | None = None
    max_tokens: int | None = None  # converted to steps: ceil(max_tokens / (global_batch * seq_len))
    seed: int = 0
    precision: str = "fp32"  # fp32 | bf16 (autocast; master weights and optimizer stay fp32)
    gradient_checkpointing: bool = False
    fsdp: bool = False  # shard weights, gradients, AdamW state over the processes (sharding.py)
    compile: bool = False  # torch.compile the model (recommended on CUDA: compiles flex_attention)
    # how a diffusion micro-batch is computed (training/layout.py); all give the same loss:
    # shared_clean: [x_t ; x_t' ; x_0] per row (complementary twins share the clean stream);
    # twins: [x_t ; x_0] per view (the reference layout)
    layout: str = "shared_clean"
    skip_untargeted: bool = True  # no noisy block, row-tail block or logit without a target
    # auto | dense | flex | block_sparse: the diffusion attention (auto: flex on CUDA when
    # compiled, block_sparse otherwise); the AR objective and term use flex or else dense
    attention: str = "auto"
    log_interval: int = 10
    eval_interval: int = 0  # 0: validate only at the end
    save_interval: int = 0  # 0: no intermediate checkpoints
    keep_last_k: int = 2

    def __post_init__(self):
        for key in ("micro_batch_size", "grad_accum_steps", "log_interval", "keep_last_k"):
            _positive(getattr(self, key), f"train.{key}")
        for key in ("eval_interval", "save_interval"):
            _positive(getattr(self, key), f"train.{key}", allow_zero=True)
        _choice(self.precision, ("fp32", "bf16"), "train.precision")
        _choice(self.attention, ("auto", "dense", "flex", "block_sparse"), "train.attention")
        _choice(self.layout, ("shared_clean", "twins"), "train.layout")
        if (self.max_steps is None) == (self.max_tokens is None):
            raise FastDLLMError("set exactly one of train.max_steps and train.max_tokens",
                                field="train.max_steps")
        for key in ("max_steps", "max_tokens"):
            if getattr(self, key) is not None:
                _positive(getattr(self, key), f"train.{key}")


@dataclass(frozen=True)
class TrainConfig:
    data: DataConfig
    output_dir: str
    train: LoopConfig  # required: a run has no sensible default length
    objective: str = "diffusion"  # diffusion (Fast-dLLM v2 adaptation) | ar (next-token)
    init_from: str = "pretrained"  # pretrained | scratch
    base_model: str | None = None  # checkpoint directory (init_from: pretrained)
    tokenizer: str | None = None  # tokenizer directory; default: base_model's
    model: ScratchModelConfig | None = None  # architecture (init_from: scratch)
    official_layout: bool = False  # write Fast_dLLM_Qwen config.json (Qwen2 bases only)
    pad_vocab_to_multiple_of: int = 64  # when adding [MASK] must grow the embedding
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)

    def __post_init__(self):
        _choice(self.objective, OBJECTIVES, "objective")
        _choice(self.init_from, INIT_FROM, "init_from")
        _positive(self.pad_vocab_to_multiple_of, "pad_vocab_to_multiple_of")
        if self.init_from == "pretrained":
            if not self.base_model:
                raise FastDLLMError("base_model is required with init_from: pretrained "
                                    "(a checkpoint directory)", field="base_model")
            if self.model is not None:
                raise FastDLLMError("the model section describes a from-scratch architecture; "
                                    "remove it or set init_from: scratch", field="model")
        else:
            if self.model is None or not self.tokenizer:
                raise FastDLLMError("init_from: scratch needs a model section (architecture) and "
                                    "tokenizer (a directory with tokenizer files)", field="model")
            if self.base_model:
                raise FastDLLMError("base_model is ignored with init_from: scratch; remove it",
                                    field="base_model")
        if self.objective == "diffusion" and self.data.seq_len % self.diffusion.block_size:
            raise FastDLLMError(
                f"data.seq_len ({self.data.seq_len}) must be a multiple of diffusion.block_size "
                f"({self.diffusion.block_size}) so that every block fits in a packed row",
                field="data.seq_len")
        if self.objective == "ar" and self.data.padding == "mask":
            raise FastDLLMError("data.padding: mask is for the diffusion objective; use eos with ar",
                                field="data.padding")

    @property
    def alignment(self) -> int:
        """Examples start on multiples of this (the diffusion block; 1 for AR)."""
        return self.diffusion.block_size if self.objective == "diffusion" else 1

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))


SECTIONS = {"data": DataConfig, "train": LoopConfig, "diffusion": DiffusionConfig,
            "optimizer": OptimizerConfig}


def with_added_defaults(saved: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's saved config with the keys added to the code since it was written, where
    the given config holds their default (defaults of new keys keep the old behaviour), so a run
    started before a key existed resumes under its defaults."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in saved.items()}
    for section, cls in SECTIONS.items():
        if not isinstance(out.get(section), dict) or not isinstance(given.get(section), dict):
            continue
        for f in dataclasses.fields(cls):
            if f.name in out[section] or f.name not in given[section] or f.default is dataclasses.MISSING:
                continue
            if given[section][f.name] == _plain(f.default):
                out[section][f.name] = given[section][f.name]
    return out


def _plain(value):
    """JSON-shaped copy (tuples become lists) so saved and fresh configs compare equal."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
