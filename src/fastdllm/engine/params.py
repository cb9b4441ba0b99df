"""Decoding parameters: one frozen dataclass, validated where it is built.

Defaults follow Fast-dLLM v2 (paper §3.3 and the official `generate()`): block size 32,
sub-block size 8, confidence threshold 0.9, both caches on, greedy. The parallel-decoding rule
is ours: "left_anchored" (measured better on the validation split, docs/design.md); the
official one is rule="threshold".
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import FastDLLMError
from ..model.weights import free_bytes
from ..rounding import round_up
from .selection import RULES

MODES = ("diffusion", "ar", "speculative")
DRAFT_CACHES = ("block", "reuse")
CONFIDENCES = ("model", "sampler")
# Bounds on what one request may ask for. Temperatures below 1e-3 divide logits into
# overflow (inf - inf = NaN in the softmax) and above 100 the distribution is uniform noise;
# seeds are what torch.Generator.manual_seed accepts (a signed 64-bit range, non-negative here).
MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-3, 100.0
MAX_SEED = 2**63 - 1
MAX_NEW_TOKENS = 1 << 20
MAX_BLOCK_SIZE = 4096
MAX_TOP_K = 2**31 - 1
# The smallest normal float32: top_p and the threshold are compared with float32 probabilities,
# and a smaller positive value rounds to 0 there (top_p 1e-46 would drop every token)
MIN_PROBABILITY = 1.1754943508222875e-38
# OpenAI's bounds: logit_bias values in [-100, 100], penalties in [-2, 2], at most 20 top
# alternatives per position (`logprobs`)
MAX_LOGIT_BIAS, MAX_PENALTY, MAX_TOP_LOGPROBS = 100.0, 2.0, 20


@dataclass(frozen=True)
class DecodeConfig:
    mode: str = "diffusion"
    max_new_tokens: int = 256
    block_size: int = 32
    sub_block_size: int = 8
    threshold: float = 0.9
    # the parallel-decoding rule the threshold drives (engine/selection.py): "left_anchored"
    # (joint confidence; the default: it dominates the official rule on the validation split,
    # docs/design.md), "threshold" (the official Fast-dLLM v2 rule) or "entropy_bounded"
    rule: str = "left_anchored"
    # temperature of the confidences the rule reads (temperature scaling, fitted on the
    # validation split; evaluation/calibration.py): a drawn token's confidence becomes its
    # probability under softmax(logits / confidence_temperature). 1.0 (default): the confidence
    # is the drawing distribution's probability, bit for bit the official rule's input. The
    # token drawn never changes; a checkpoint's generation_config.json may set it
    confidence_temperature: float = 1.0
    # which probability of a *sampled* diffusion token the rule reads: "model" (default) its
    # probability under the model's own distribution (softmax(logits / confidence_temperature)),
    # so that as the sampling temperature goes to 0 decoding goes to greedy (tempered
    # confidences are all ~1 and would unmask everything at once); "sampler" its probability
    # under the distribution it was drawn from (the official Fast-dLLM v2 sampler). Greedy rows
    # read the same number either way. Decided on the validation split (docs/design.md)
    confidence: str = "model"
    block_cache: bool = True  # False: the slow reference that recomputes the sequence every step
    sub_block_cache: bool = True
    token_shift: bool = True  # token i is predicted from the output at i - 1 (paper §3.2)
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None
    trace: bool = False  # record which positions each step unmasked, with confidences
    # speculative mode (engine/speculative.py): tokens drafted per cycle by the block-diffusion
    # draft, and the forwards spent drafting them (1 = one forward; more = refinement steps)
    draft_length: int = 8
    draft_steps: int = 1
    # the draft's cache inside the block being drafted: "reuse" (default) keeps the block's KV
    # from earlier cycles (stale, like the sub-block cache) and encodes only the newly accepted
    # tokens and the k drafts; "block" re-encodes the whole block every cycle (exact block
    # cache only). Either way the output is the target's: only the acceptance rate can differ
    draft_cache: str = "reuse"
    merged: bool = False  # self-speculative only: verify and draft in one forward (merged.py)
    # logit processing (engine/logit_processing.py), applied to the logits before every draw:
    # an additive bias per token id (OpenAI's logit_bias), and penalties on the tokens this
    # sequence has made final so far (presence: once per distinct token; frequency: per use)
    logit_bias: tuple[tuple[int, float], ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # record each generated token's log-probability under the distribution it was drawn from,
    # with this many most likely alternatives (None: record nothing; 0: the token's own only)
    logprobs: int | None = None

    def __post_init__(self):
        if not isinstance(self.mode, str) or self.mode not in MODES:
            raise FastDLLMError(f"mode must be one of {MODES}, got {self.mode!r}", field="mode")
        _integer("max_new_tokens", self.max_new_tokens, 1, MAX_NEW_TOKENS, "a positive integer")
        _integer("block_size", self.block_size, 1, MAX_BLOCK_SIZE, "positive")
        _integer("sub_block_size", self.sub_block_size, 1, MAX_BLOCK_SIZE, "positive")
        if self.block_size % self.sub_block_size:
            raise FastDLLMError(
                f"sub_block_size ({self.sub_block_size}) must divide block_size ({self.block_size})",
                field="sub_block_size",
                fixes=[("sub_block_size", _largest_divisor_at_most(self.block_size, 8))])
        _real("threshold", self.threshold)
        if not MIN_PROBABILITY <= self.threshold <= 1.0:
            raise FastDLLMError(
                f"threshold must be in (0, 1] (at least {MIN_PROBABILITY:g}), got {self.threshold}; 1.0 unmasks one token per step, "
                "lower values unmask more tokens in parallel", field="threshold")
        if not isinstance(self.rule, str) or self.rule not in RULES:
            raise FastDLLMError(
                f"rule must be one of {', '.join(RULES)}, got {self.rule!r}; threshold is the "
                "official Fast-dLLM v2 rule", field="rule", fixes=[("rule", "threshold")])
        if self.confidence not in CONFIDENCES:
            raise FastDLLMError(f"confidence must be one of {CONFIDENCES}, got {self.confidence!r}; "
                                "sampler is the official rule's input", field="confidence")
        _real("confidence_temperature", self.confidence_temperature)
        if not MIN_TEMPERATURE <= self.confidence_temperature <= MAX_TEMPERATURE:
            raise FastDLLMError(
                f"confidence_temperature must be in [{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}], got "
                f"{self.confidence_temperature}; 1.0 leaves the confidences as drawn",
                field="confidence_temperature")
        _real("temperature", self.temperature)
        if self.temperature != 0 and not MIN_TEMPERATURE <= self.temperature <= MAX_TEMPERATURE:
            raise FastDLLMError(
                f"temperature must be 0 (greedy) or in [{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}], "
                f"got {self.temperature}", field="temperature")
        _real("top_p", self.top_p)
        if not MIN_PROBABILITY <= self.top_p <= 1.0:
            raise FastDLLMError(f"top_p must be in (0, 1] and at least {MIN_PROBABILITY:g} (the "
                                f"smallest float32 the sampler compares with), got {self.top_p}",
                                field="top_p")
        _integer("top_k", self.top_k, 0, MAX_TOP_K, ">= 0 (0 = off)")
        if self.seed is not None:
            _integer("seed", self.seed, 0, MAX_SEED, "an integer in [0, 2**63)")
        for name in ("block_cache", "sub_block_cache", "token_shift", "trace", "merged"):
            if not isinstance(getattr(self, name), bool):
                raise FastDLLMError(f"{name} must be true or false, got {getattr(self, name)!r}",
                                    field=name)
        self._check_logit_processing()
        if self.speculative:
            self._check_speculation()

    def _check_logit_processing(self) -> None:
        if not isinstance(self.logit_bias, tuple):
            raise FastDLLMError("logit_bias must be a tuple of (token id, bias) pairs", field="logit_bias")
        for pair in self.logit_bias:
            if not (isinstance(pair, tuple) and len(pair) == 2):
                raise FastDLLMError(f"logit_bias must hold (token id, bias) pairs, got {pair!r}",
                                    field="logit_bias")
            _integer("logit_bias", pair[0], 0, MAX_TOP_K, "a token id >= 0")
            _real("logit_bias", pair[1])
            if not -MAX_LOGIT_BIAS <= pair[1] <= MAX_LOGIT_BIAS:
                raise FastDLLMError(f"logit_bias values must be in [-100, 100], got {pair[1]} for "
                                    f"token {pair[0]}", field="logit_bias")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _real(name, value)
            if not -MAX_PENALTY <= value <= MAX_PENALTY:
                raise FastDLLMError(f"{name} must be in [-2, 2], got {value}", field=name)
        if self.logprobs is not None:
            _integer("logprobs", self.logprobs, 0, MAX_TOP_LOGPROBS, f"in [0, {MAX_TOP_LOGPROBS}]")
        if self.speculative and self.processes_logits:
            name = next(n for n in ("logit_bias", "presence_penalty", "frequency_penalty")
                        if getattr(self, n))
            raise FastDLLMError(f"{name} is not supported in speculative decoding (the draft and the "
                                "target would need the same processing); use mode diffusion or ar",
                                field=name, fixes=[("mode", "ar")])
        if self.speculative and self.logprobs is not None:
            raise FastDLLMError("logprobs are not recorded in speculative decoding; use mode "
                                "diffusion or ar", field="logprobs", fixes=[("mode", "ar")])

    def _check_speculation(self) -> None:
        if not isinstance(self.draft_length, int) or not 1 <= self.draft_length <= self.block_size:
            raise FastDLLMError(
                f"draft_length must be between 1 and the block size ({self.block_size}): a draft "
                f"never crosses the end of its block; got {self.draft_length}", field="draft_length")
        if not isinstance(self.draft_steps, int) or not 1 <= self.draft_steps <= self.draft_length:
            raise FastDLLMError(
                f"draft_steps must be between 1 and draft_length ({self.draft_length}); got "
                f"{self.draft_steps}", field="draft_steps")
        if self.draft_cache not in DRAFT_CACHES:
            raise FastDLLMError(f"draft_cache must be one of {DRAFT_CACHES}, got "
                                f"{self.draft_cache!r}", field="draft_cache")
        if self.merged and self.draft_steps != 1:
            raise FastDLLMError("the merged form drafts inside the verifying forward, so it takes "
                                f"draft_steps 1, got {self.draft_steps}", field="draft_steps")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def processes_logits(self) -> bool:
        """Whether logits are changed before the draw (bias or penalties)."""
        return bool(self.logit_bias) or self.presence_penalty != 0 or self.frequency_penalty != 0

    @property
    def calibrated(self) -> bool:
        """Whether the rule reads confidences other than the drawing distribution's (a diffusion
        row only): temperature-scaled ones, or a sampled token's probability under the model."""
        return self.mode == "diffusion" and (
            self.confidence_temperature != 1.0
            or (self.temperature != 0.0 and self.confidence == "model"))

    @property
    def diffusion(self) -> bool:
        return self.mode == "diffusion"

    @property
    def speculative(self) -> bool:
        return self.mode == "speculative"

    @property
    def block(self) -> int:
        """The unit a sequence's positions are allocated in: whole blocks for diffusion and for
        speculative decoding (its draft decodes in blocks), 1 for AR."""
        return self.block_size if self.mode != "ar" else 1

    def cache_len(self, prompt_len: int) -> int:
        """KV-cache positions one request occupies: prompt + max_new_tokens in whole blocks."""
        return round_up(prompt_len + self.max_new_tokens, self.block)

    @property
    def step_positions(self) -> int:
        """The most positions this request puts into one forward while it decodes (its prompt's
        prefill aside), what its row costs every sequence batched with it: AR 1; diffusion a
        block; speculative the draft's forward to the block's end or the k + 1 verified; the
        merged form k + 1 verified plus k + 1 draft groups of k + 1 (merged.py)."""
        if self.mode == "ar":
            return 1
        if self.mode == "diffusion":
            return self.block_size
        if self.merged:
            return (self.draft_length + 1) * (self.draft_length + 2)
        return max(self.block_size, self.draft_length + 1)


def _integer(name: str, value, lo: int, hi: int, what: str) -> None:
    """An int (never a bool or a float) in [lo, hi], else an error naming the field."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise FastDLLMError(f"{name} must be an integer, got {value!r}", field=name)
    if not lo <= value <= hi:
        shown = value if abs(value) < 10**30 else f"an integer of {len(str(abs(value)))} digits"
        raise FastDLLMError(f"{name} must be {what}, at most {hi}, got {shown}", field=name)


def _real(name: str, value) -> None:
    """A finite int or float (never a bool, NaN or infinity), else an error naming the field."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise FastDLLMError(f"{name} must be a number, got {value!r}", field=name)
    if not math.isfinite(value):
        raise FastDLLMError(f"{name} must be a finite number, got {value!r}", field=name)


def _largest_divisor_at_most(n: int, cap: int) -> int:
    return max(d for d in range(1, min(n, cap) + 1) if n % d == 0)


@dataclass(frozen=True)
class RunnerConfig:
    """How the engine runs its steps (not what it decodes).

    enforce_eager: never use static steps (no CUDA graphs, no torch.compile).
    cpu_static: static steps on the CPU: "off" (default: on the 2-core benchmark machine
        compiling does not pay for itself, docs/design.md), "compile" (torch.compile, inductor) or
        "eager" (the static step's padded layout run eagerly: what tests use to check the
        CUDA-graph step's inputs and padding without a GPU).
    widths: step widths captured as static steps (AR 1, sub-block S, block B); a step whose
        widest row fits one is padded up to it. The speculative engine gives each of its two
        models the widths its forwards take instead (speculative.py: verify_widths, draft_widths).
    max_batch: the largest batch bucket (buckets are powers of two up to it; 0: the engine's slots).
    warmup_seconds: cap on the time spent capturing/compiling at start; shapes not ready by then
        run eagerly.
    compile_graphs: on the GPU, compile each static step with inductor before capturing it as a
        CUDA graph (fewer, fused kernels per layer); a step that fails to compile is captured
        uncompiled.
    """

    enforce_eager: bool = False
    cpu_static: str = "off"
    widths: tuple[int, ...] = (1, 8, 32)
    max_batch: int = 0
    warmup_seconds: float = 120.0
    compile_graphs: bool = True

    def __post_init__(self):
        if self.cpu_static not in ("off", "eager", "compile"):
            raise FastDLLMError(f"cpu_static must be off, eager or compile, got {self.cpu_static!r}",
                                field="cpu_static")
        if not self.widths or any(w <= 0 for w in self.widths):
            raise FastDLLMError(f"widths must be positive, got {self.widths}", field="widths")
        if self.max_batch < 0:
            raise FastDLLMError(f"max_batch must be >= 0, got {self.max_batch}", field="max_batch")
        if self.warmup_seconds < 0:
            raise FastDLLMError(f"warmup_seconds must be >= 0, got {self.warmup_seconds}",
                                field="warmup_seconds")


# The KV pool's default size when none is given: on a GPU half of the memory free when the
# engine is built (the weights are loaded by then; activations, graphs and the allocator's
# slack need the rest); on the CPU 1 GiB, which costs only what is used (pages are written
# when first handed out) and holds ~350k positions of the shipped model.
DEFAULT_GPU_FRACTION = 0.5
DEFAULT_CPU_BYTES = 1 << 30
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1000, "kib": 1 << 10, "m": 1 << 20, "mb": 10**6,
          "mib": 1 << 20, "g": 1 << 30, "gb": 10**9, "gib": 1 << 30, "t": 1 << 40, "tb": 10**12,
          "tib": 1 << 40}


@dataclass(frozen=True)
class CacheConfig:
    """The paged KV cache (engine/block_manager.py).

    memory: the pool's size: bytes (an int >= 1), or a fraction in (0, 1) of the memory free on
        the device when the engine is built; None: DEFAULT_GPU_FRACTION on a GPU,
        DEFAULT_CPU_BYTES on the CPU. Never less than one longest request.
    prefix_caching: reuse the KV of whole committed blocks shared with earlier requests (a
        system prompt, earlier chat turns); exact, on by default.
    """

    memory: int | float | None = None
    prefix_caching: bool = True

    def __post_init__(self):
        m = self.memory
        if m is not None:
            if isinstance(m, bool) or not isinstance(m, (int, float)) or not math.isfinite(m):
                raise FastDLLMError(f"kv_cache_memory must be a number of bytes or a fraction, got "
                                    f"{m!r}", field="kv_cache_memory")
            if isinstance(m, float) and not m.is_integer() and not 0 < m < 1:
                raise FastDLLMError(f"kv_cache_memory must be a whole number of bytes or a fraction "
                                    f"in (0, 1) of free memory, got {m}", field="kv_cache_memory")
            if m <= 0:
                raise FastDLLMError(f"kv_cache_memory must be > 0, got {m}", field="kv_cache_memory")
        if not isinstance(self.prefix_caching, bool):
            raise FastDLLMError(f"prefix_caching must be true or false, got {self.prefix_caching!r}",
                                field="prefix_caching")

    def budget(self, device) -> int:
        """The pool's size in bytes on `device` (a torch.device)."""
        m = self.memory
        if m is not None and (isinstance(m, int) or m >= 1):
            return int(m)
        fraction = m if m is not None else (DEFAULT_GPU_FRACTION if device.type == "cuda" else None)
        if fraction is None:
            return DEFAULT_CPU_BYTES
        free = free_bytes(device)
        return int(fraction * (free if free is not None else 4 * DEFAULT_CPU_BYTES))


def parse_memory(text: str) -> int | float:
    """'4GiB', '512M', '1073741824' (bytes) or '0.5' (a fraction of free memory)."""
    t = text.strip().lower().replace("_", "")
    num = t.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = t[len(num):].strip()
    try:
        value = float(num)
    except ValueError:
        value = None
    if value is None or unit not in _UNITS or not math.isfinite(value):
        raise FastDLLMError(f"kv_cache_memory must be bytes (e.g. 4GiB, 512MiB, 1073741824) or a "
                            f"fraction of free memory (e.g. 0.5), got {text!r}", field="kv_cache_memory")
    if unit == "" and 0 < value < 1:
        return value
    return int(value * _UNITS[unit])
