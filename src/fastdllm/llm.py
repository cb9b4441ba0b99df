"""The Python API: load a checkpoint once, then generate from text, chat messages or token ids.

    from fastdllm import LLM
    llm = LLM.load("path/to/checkpoint")              # or a hub id
    out = llm.generate("What is 3 + 4?", max_new_tokens=64)
    print(out.text, out.stats["tokens_per_forward"])

    for step in llm.stream(["What is 3 + 4?"]):        # the driver under generate and the chat:
        print(llm.decode(step.deltas[0].token_ids))    # what each forward made final
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator
from typing import Sequence as Seq

import torch

from .chat_template import TemplateLimits, render_chat
from .engine.engine import Engine, Step
from .engine.params import CacheConfig, DecodeConfig, RunnerConfig, parse_memory
from .engine.sequence import Sequence
from .engine.speculation import Speculation
from .engine.speculative import SpeculativeEngine, check_pair
from .errors import FastDLLMError
from .model.checkpoint import (
    SpecialTokens,
    load_model,
    load_tokenizer,
    read_config,
    resolve_model_dir,
    resolve_special_tokens,
)
from .model.config import ModelConfig
from .model.kv_cache import KVCache
from .model.transformer import Transformer
from .rounding import round_up

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


@dataclass
class GenerationResult:
    token_ids: list[int]  # new tokens only (a final stop token included)
    text: str | None
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int
    stats: dict[str, Any]
    trace: list[dict] | None = None
    params: DecodeConfig | None = None  # the decoding configuration used (for reports, replays)
    prompt_ids: list[int] | None = None

    def as_dict(self) -> dict[str, Any]:
        out = {"token_ids": self.token_ids, "text": self.text, "finish_reason": self.finish_reason,
               "prompt_tokens": self.prompt_tokens, **self.stats}
        if self.trace is not None:
            out["trace"] = self.trace
        return out


def _confidence_temperature(model_dir: Path) -> float:
    """generation_config.json's "confidence_temperature" (a fitted calibration), else 1.0."""
    path = model_dir / "generation_config.json"
    if not path.is_file():
        return 1.0
    value = json.loads(path.read_text()).get("confidence_temperature", 1.0)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise FastDLLMError(f"{path}: confidence_temperature must be a positive number, got {value!r}",
                            field="confidence_temperature")
    return float(value)


@dataclass
class LLM:
    model: Transformer
    tokenizer: Any
    model_dir: Path
    special: SpecialTokens
    default_block_size: int = 32
    # the checkpoint's fitted confidence temperature (generation_config.json
    # "confidence_temperature"), the default of every diffusion decode; 1.0 when absent
    default_confidence_temperature: float = 1.0
    runner: RunnerConfig = field(default_factory=RunnerConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    draft: "LLM | None" = None  # the block-diffusion draft model of speculative decoding
    adapted: bool = True  # adapted for block diffusion (see `is_adapted`); if not, AR only
    _engine: Engine | None = field(default=None, repr=False)
    _spec_engine: SpeculativeEngine | None = field(default=None, repr=False)

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, name_or_path: str | Path, *, device: str | None = None, dtype: str | None = None,
             mask_token_id: int | None = None, stop_token_ids: Seq[int] | None = None,
             draft_model: str | Path | None = None, enforce_eager: bool = False,
             cpu_compile: bool = False, kv_cache_memory: int | float | str | None = None,
             prefix_caching: bool = True) -> "LLM":
        """`draft_model`: a block-diffusion model (same tokenizer) whose drafts this model
        verifies: decoding then defaults to mode "speculative" and gives this model's own output
        at several tokens per forward. `mask_token_id` is the draft's when a draft is given.
        `enforce_eager`: no CUDA graphs (on the GPU, static decode steps are captured when an
        engine is built, with a progress line and a time cap; see RunnerConfig). `cpu_compile`:
        on the CPU, compile the static decode steps with torch.compile when an engine is built
        (faster steps after a warm-up of seconds per shape; docs/design.md, "Static steps").
        `kv_cache_memory`: the paged KV cache's size: bytes (an int, or "4GiB", "512MiB"), or a
        fraction of free memory (0.5) (default: half the free GPU memory, 1 GiB on the CPU;
        see CacheConfig);
        `prefix_caching`: reuse the KV of committed blocks shared with earlier prompts."""
        if isinstance(kv_cache_memory, str):
            kv_cache_memory = parse_memory(kv_cache_memory)
        cache = CacheConfig(kv_cache_memory, prefix_caching)
        draft = None
        if draft_model is not None:
            draft = cls.load(draft_model, device=device, dtype=dtype, mask_token_id=mask_token_id,
                             enforce_eager=enforce_eager)
        model_dir = resolve_model_dir(name_or_path)
        cfg, _ = read_config(model_dir)
        dev = _resolve_device(device)
        torch_dtype = _resolve_dtype(dtype, dev)
        model = load_model(model_dir, dev, torch_dtype)
        tokenizer = load_tokenizer(model_dir)
        special = resolve_special_tokens(
            cfg, model_dir, tokenizer, mask_token_id,
            tuple(stop_token_ids) if stop_token_ids is not None else None)
        block = cfg.bd_size or 32
        if draft is not None:
            check_pair(model, draft.model, draft.special.mask_token_id)
            check_same_tokenizer(model_dir, tokenizer, draft.model_dir, draft.tokenizer)
            block = draft.default_block_size
        runner = RunnerConfig(enforce_eager=enforce_eager, widths=(1, min(8, block), block),
                              cpu_static="compile" if cpu_compile else "off")
        return cls(model, tokenizer, model_dir, special, default_block_size=block, draft=draft,
                   runner=runner, cache=cache, adapted=is_adapted(cfg, mask_token_id),
                   default_confidence_temperature=_confidence_temperature(model_dir))

    @property
    def config(self) -> ModelConfig:
        return self.model.config

    @property
    def context_length(self) -> int:
        return self.config.max_position_embeddings

    def decode_config(self, config: DecodeConfig | None = None, **overrides) -> DecodeConfig:
        """Defaults from the checkpoint (block size = its bd_size; mode: speculative with a draft
        model, else diffusion, or ar for a checkpoint never adapted), then `overrides`. Every
        front end builds its decoding settings here, so diffusion on a checkpoint that was never
        adapted is refused here for all of them."""
        mode = "speculative" if self.draft else "diffusion" if self.adapted else "ar"
        base = config or DecodeConfig(block_size=self.default_block_size,
                                      sub_block_size=min(8, self.default_block_size),
                                      token_shift=self.config.token_shift, mode=mode,
                                      draft_length=min(8, self.default_block_size),
                                      confidence_temperature=self.default_confidence_temperature)
        overrides = {k: v for k, v in overrides.items() if v is not None}
        params = dataclasses.replace(base, **overrides) if overrides else base
        if params.diffusion and not self.adapted:
            raise FastDLLMError(
                f"{self.model_dir.name} was never adapted for block diffusion (its config.json has "
                "no bd_size and no mask_token_id), so diffusion decoding would only produce "
                "garbage; decode it autoregressively, or adapt it first with `fastdllm train` "
                "(objective diffusion); if it was adapted, give its mask_token_id",
                field="mode", fixes=[("mode", "ar")])
        return params

    # ------------------------------------------------------------------ prompts
    def encode(self, prompt: str | Seq[int], *, tokenizer=None) -> list[int]:
        """Prompt ids from text or ids. `tokenizer`: another instance of this checkpoint's
        tokenizer (a fast tokenizer must not be used by two threads at once)."""
        tokenizer = tokenizer or self.tokenizer
        if isinstance(prompt, str):
            if tokenizer is None:
                raise FastDLLMError(f"{self.model_dir} has no tokenizer files; pass token ids "
                                    "instead of text", field="prompt", fixes=[("prompt_ids", [1, 2, 3])])
            _check_text(prompt, "prompt")
            ids = tokenizer.encode(prompt, add_special_tokens=True)
        else:
            ids = [int(i) for i in prompt]
        self._check_prompt(ids)
        return ids

    def encode_chat(self, messages: list[dict[str, str]], *, tokenizer=None,
                    limits: TemplateLimits | None = None) -> list[int]:
        """Prompt ids of `messages` rendered with the checkpoint's chat template (in a bounded
        sandbox, see chat_template.py) plus the generation prompt."""
        tokenizer = tokenizer or self.tokenizer
        template = getattr(tokenizer, "chat_template", None) if tokenizer is not None else None
        if isinstance(template, dict):  # several named templates: the default one
            template = template.get("default")
        if not template:
            raise FastDLLMError(f"{self.model_dir} has no chat template; send a plain prompt instead",
                                field="messages")
        if not messages:
            raise FastDLLMError("messages must not be empty", field="messages")
        for i, m in enumerate(messages):
            for key, value in m.items():
                if isinstance(value, str):
                    _check_text(value, f"messages[{i}].{key}")
        text = render_chat(template, messages, limits=limits or TemplateLimits(),
                           name=f"the chat template of {self.model_dir.name}",
                           **_special_tokens(tokenizer))
        # the template writes the special tokens itself, as apply_chat_template assumes
        ids = [int(i) for i in tokenizer.encode(text, add_special_tokens=False)]
        self._check_prompt(ids)
        return ids

    def decode(self, ids: list[int]) -> str | None:
        if self.tokenizer is None:
            return None
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _check_prompt(self, ids: list[int]) -> None:
        if not ids:
            raise FastDLLMError("the prompt is empty; give at least one token", field="prompt")
        bad = [i for i in ids if not 0 <= i < self.config.vocab_size]
        if bad:
            raise FastDLLMError(f"prompt token ids {bad[:5]} are outside the vocabulary "
                                f"(0..{self.config.vocab_size - 1})", field="prompt")
        if len(ids) >= self.context_length:
            raise FastDLLMError(f"the prompt has {len(ids)} tokens but the model's context is "
                                f"{self.context_length}; shorten the prompt", field="prompt")

    def check_request(self, prompt_len: int, params: DecodeConfig) -> None:
        if prompt_len + params.max_new_tokens > self.context_length:
            raise FastDLLMError(
                f"prompt ({prompt_len} tokens) + max_new_tokens ({params.max_new_tokens}) exceeds "
                f"the model's context of {self.context_length}; lower max_new_tokens to at most "
                f"{self.context_length - prompt_len}", field="max_new_tokens")

    # ------------------------------------------------------------------ engine
    def new_engine(self, slots: int, needed: int, block: int = 1, context: int | None = None, *,
                   speculative: bool = False) -> Engine | SpeculativeEngine:
        """A fresh engine for `slots` sequences of up to `context` positions (the model's unless
        a front end serves less; at least `needed`, rounded to whole blocks of `block`), over a
        paged KV cache of `self.cache.memory` (pages of the model's block size). `speculative`:
        this model verifies drafts of `draft`, or of itself (self-speculative) when it has none;
        that engine also decodes mode "ar". Either engine's static steps are captured here (CUDA
        graphs; a progress line and a time cap, see RunnerConfig), which is also when a server
        warms up."""
        page = self.default_block_size
        max_len = round_up(round_up(max(needed, context or self.context_length), block), page)
        pages = self.pool_pages(page, two_models=speculative)
        if speculative:
            draft = self.draft or self
            engine = SpeculativeEngine(self.model, draft.model, max_slots=slots, max_len=max_len,
                                       num_pages=pages, page_size=page,
                                       mask_token_id=draft.special.mask_token_id,
                                       stop_token_ids=self.special.stop_token_ids, runner=self.runner)
            engine.warm_up()
            return engine
        engine = Engine(self.model, max_slots=slots, max_len=max_len, num_pages=pages, page_size=page,
                        mask_token_id=self.special.mask_token_id,
                        stop_token_ids=self.special.stop_token_ids, runner=self.runner,
                        prefix_caching=self.cache.prefix_caching)
        engine.warm_up()
        return engine

    def pool_pages(self, page: int, *, two_models: bool = False) -> int:
        """Pages of the KV pool: the memory budget over one page's bytes (a speculative engine
        splits it between its two caches). A request longer than the whole pool is refused
        when it is added (check_room), naming kv_cache_memory."""
        p = next(self.model.parameters())
        cfg = self.model.config
        per_page = KVCache.bytes_per_page(cfg.num_layers, page, cfg.num_kv_heads, cfg.head_dim, p.dtype)
        budget = self.cache.budget(p.device) // (2 if two_models else 1)
        return max(budget // per_page, 2)

    def engine(self, slots: int, needed: int, block: int = 1, *,
               speculative: bool = False) -> Engine | SpeculativeEngine:
        """The engine this LLM reuses across calls (its prefix cache with it), with room for at
        least `slots` sequences of `needed` positions; a new one (`new_engine`) only when it is
        too small or busy."""
        e = self._spec_engine if speculative else self._engine
        if e is None or e.max_slots < slots or e.max_len < needed or e.running:
            if e is not None and not e.running:  # replaced: free its graphs and cache first
                e.close()
            # never left holding a closed engine, should building the new one fail
            if speculative:
                self._spec_engine = None
            else:
                self._engine = None
            e = self.new_engine(slots, needed, block, speculative=speculative)
            if speculative:
                self._spec_engine = e
            else:
                self._engine = e
        return e

    def generate(self, prompt: str | Seq[int] | None = None, *, messages: list[dict] | None = None,
                 config: DecodeConfig | None = None, stop_token_ids: Seq[int] | None = None,
                 **overrides) -> GenerationResult:
        """One prompt (text or token ids) or one chat (`messages`)."""
        if (prompt is None) == (messages is None):
            raise FastDLLMError("give exactly one of prompt or messages", field="prompt")
        ids = self.encode_chat(messages) if messages is not None else self.encode(prompt)
        return self.generate_batch([ids], config=config, stop_token_ids=stop_token_ids, **overrides)[0]

    def generate_batch(self, prompts: Seq[str | Seq[int]], *, config: DecodeConfig | None = None,
                       stop_token_ids: Seq[int] | None = None,
                       **overrides) -> list[GenerationResult]:
        """Decode several prompts together (`stream` to the end); finished sequences leave the batch."""
        t0 = time.perf_counter()
        seqs: list[Sequence] = []
        batch_calls = 0
        for step in self.stream(prompts, config=config, stop_token_ids=stop_token_ids, **overrides):
            seqs = seqs or [d.seq for d in step]  # the first step holds every sequence
            batch_calls += step.forward_calls
        batch_seconds = time.perf_counter() - t0
        return [self._result(s, batch_calls, batch_seconds) for s in seqs]

    def stream(self, prompts: Seq[str | Seq[int]], *, config: DecodeConfig | None = None,
               stop_token_ids: Seq[int] | None = None, **overrides) -> Iterator[Step]:
        """Decode prompts together, yielding after every engine step what it made final in each
        sequence (`Step`: a `Delta` per running sequence, in prompt order). The requests are
        checked and their sequences added here, before the first step; iterate to the end, or
        close the iterator (a `break` in a for loop, Ctrl-C) to free their slots."""
        if not prompts:
            raise FastDLLMError("no prompts given", field="prompt")
        params = self.decode_config(config, **overrides)
        ids = [self.encode(p) for p in prompts]
        for x in ids:
            self.check_request(len(x), params)
        engine = self.engine(len(ids), max(params.cache_len(len(x)) for x in ids), params.block,
                             speculative=params.speculative)
        stops = tuple(stop_token_ids) if stop_token_ids is not None else None
        seqs = [engine.add(x, params, stop_token_ids=stops) for x in ids]
        return _drive(engine, seqs)

    def _result(self, seq: Sequence | Speculation, batch_calls: int, batch_seconds: float) -> GenerationResult:
        out = seq.output_ids()
        stats = seq.stats.as_dict()
        stats.update(batch_forward_calls=batch_calls, batch_seconds=round(batch_seconds, 6),
                     mode=seq.params.mode)
        return GenerationResult(out, self.decode(out), seq.finish_reason or "length",
                                seq.prompt_len, stats, seq.trace, params=seq.params,
                                prompt_ids=seq.tokens[: seq.prompt_len])


def is_adapted(cfg: ModelConfig, mask_token_id: int | None = None) -> bool:
    """Whether a checkpoint was adapted for block diffusion: its config.json names its block size
    (`bd_size`, the published layout) or its mask token (`mask_token_id`, `fastdllm train`), or
    the caller names the mask token (`mask_token_id`). A |<MASK>| in the tokenizer alone does
    not count: an AR base can share the tokenizer of the model adapted from it (the shipped
    fastdllm-wp-ar does), and decoding it by diffusion gives garbage (issue 21, class 11)."""
    return cfg.bd_size is not None or cfg.mask_token_id is not None or mask_token_id is not None


def check_same_tokenizer(target_dir: Path, target_tok, draft_dir: Path, draft_tok) -> None:
    """Speculative decoding compares token ids, so both models must mean the same thing by every
    id both can emit: each id both tokenizers define is the same token, and each token both define
    has the same id. A token only one of them has is allowed (an adapted model's tokenizer gains
    the mask token that its AR base lacks; the draft never proposes it)."""
    if target_tok is None or draft_tok is None:
        return  # token-id prompts only; check_pair still compares the vocabulary sizes
    target, draft = target_tok.get_vocab(), draft_tok.get_vocab()
    target_ids, draft_ids = {i: t for t, i in target.items()}, {i: t for t, i in draft.items()}
    differ = [f"id {i}: {target_ids[i]!r} vs {draft_ids[i]!r}"
              for i in sorted(target_ids.keys() & draft_ids.keys()) if target_ids[i] != draft_ids[i]]
    differ += [f"{t!r}: id {target[t]} vs {draft[t]}"
               for t in sorted(target.keys() & draft.keys()) if target[t] != draft[t]]
    if differ:
        raise FastDLLMError(
            f"the draft model {draft_dir} has another tokenizer than the target {target_dir} "
            f"(target vs draft: {'; '.join(differ[:3])}"
            f"{f'; {len(differ) - 3} more' if len(differ) > 3 else ''}); speculative decoding "
            "needs both on the same tokenizer (the draft may add tokens, such as its mask token)",
            field="draft_model")


def _drive(engine: Engine | SpeculativeEngine, seqs: list) -> Iterator[Step]:
    try:
        yield from engine.stream()
    finally:  # stopped early: the unfinished sequences give their slots back
        for seq in seqs:
            engine.abort(seq)
    failed = next((s.error for s in seqs if s.error is not None), None)
    if failed is not None:  # the others finished; this one failed alone (a bug)
        raise failed


def _check_text(text: str, field: str) -> None:
    """Text a tokenizer can take: valid Unicode (JSON can carry a lone surrogate, which no
    tokenizer encodes)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise FastDLLMError(f"{field} is not valid Unicode: {e.reason} at character {e.start}",
                            field=field) from None


def _special_tokens(tokenizer) -> dict[str, Any]:
    """What apply_chat_template passes to a template besides the messages (bos_token, ...)."""
    return {k: v for k, v in tokenizer.special_tokens_map.items() if isinstance(v, (str, list))}


def _resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise FastDLLMError(f"unknown device {device!r}; use cpu, cuda or cuda:N", field="device") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise FastDLLMError("device cuda was asked for but no CUDA GPU is available", field="device",
                            fixes=[("device", "cpu")])
    return dev


def _resolve_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise FastDLLMError(f"unknown dtype {dtype!r}; use one of {sorted(DTYPES)}", field="dtype")
    return DTYPES[dtype]
