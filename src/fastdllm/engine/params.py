"""Decoding parameters: one frozen dataclass, validated where it is built.

Defaults follow Fast-dLLM v2 (paper §3.3 and the official `generate()`): block size 32,
sub-block size 8, confidence threshold 0.9, both caches on, greedy.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import FastDLLMError
from ..rounding import round_up

MODES = ("diffusion", "ar")


@dataclass(frozen=True)
class DecodeConfig:
    mode: str = "diffusion"
    max_new_tokens: int = 256
    block_size: int = 32
    sub_block_size: int = 8
    threshold: float = 0.9
    block_cache: bool = True  # False: the slow reference that recomputes the sequence every step
    sub_block_cache: bool = True
    token_shift: bool = True  # token i is predicted from the output at i - 1 (paper §3.2)
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None
    trace: bool = False  # record which positions each step unmasked, with confidences

    def __post_init__(self):
        if self.mode not in MODES:
            raise FastDLLMError(f"mode must be one of {MODES}, got {self.mode!r}", field="mode")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens <= 0:
            raise FastDLLMError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}",
                                field="max_new_tokens")
        if self.block_size <= 0:
            raise FastDLLMError(f"block_size must be positive, got {self.block_size}", field="block_size")
        if self.sub_block_size <= 0 or self.block_size % self.sub_block_size:
            raise FastDLLMError(
                f"sub_block_size ({self.sub_block_size}) must divide block_size ({self.block_size})",
                field="sub_block_size",
                fixes=[("sub_block_size", _largest_divisor_at_most(self.block_size, 8))])
        if not 0.0 < self.threshold <= 1.0:
            raise FastDLLMError(
                f"threshold must be in (0, 1], got {self.threshold}; 1.0 unmasks one token per step, "
                "lower values unmask more tokens in parallel", field="threshold")
        if self.temperature < 0:
            raise FastDLLMError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}",
                                field="temperature")
        if not 0.0 < self.top_p <= 1.0:
            raise FastDLLMError(f"top_p must be in (0, 1], got {self.top_p}", field="top_p")
        if self.top_k < 0:
            raise FastDLLMError(f"top_k must be >= 0 (0 = off), got {self.top_k}", field="top_k")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def diffusion(self) -> bool:
        return self.mode == "diffusion"

    @property
    def block(self) -> int:
        """The unit a sequence's positions are allocated in: whole blocks for diffusion, 1 for AR."""
        return self.block_size if self.diffusion else 1

    def cache_len(self, prompt_len: int) -> int:
        """KV-cache positions one request occupies: prompt + max_new_tokens in whole blocks."""
        return round_up(prompt_len + self.max_new_tokens, self.block)


def slot_len(needed: int, context: int, block: int) -> int:
    """Positions an engine slot is allocated with, the one sizing rule of every front end:
    `needed` grown to the next power of two (so a longer next prompt or a growing conversation
    rarely reallocates), but not past the context, in whole blocks (a diffusion sequence's last
    block may overhang the context)."""
    n = max(needed, min(1 << (needed - 1).bit_length(), context))
    return round_up(n, block)


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
        widest row fits one is padded up to it.
    max_batch: the largest batch bucket (buckets are powers of two up to it; 0: the engine's slots).
    warmup_seconds: cap on the time spent capturing/compiling at start; shapes not ready by then
        run eagerly.
    """

    enforce_eager: bool = False
    cpu_static: str = "off"
    widths: tuple[int, ...] = (1, 8, 32)
    max_batch: int = 0
    warmup_seconds: float = 120.0

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
