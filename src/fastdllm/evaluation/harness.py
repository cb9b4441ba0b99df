"""The lm-evaluation-harness model `fastdllm` (lm-eval 0.4.x, the `fastdllm[eval]` extra).

    lm_eval --model fastdllm --model_args pretrained=DIR,mode=diffusion,threshold=0.9 --tasks gsm8k

or from Python:

    import lm_eval
    from fastdllm.evaluation.harness import FastDLLMLM
    lm_eval.simple_evaluate(model=FastDLLMLM(pretrained=DIR, threshold=1.0), tasks=["gsm8k"])

Registration: importing this module registers the class under "fastdllm". The `lm_eval` command
finds it without an import because the `fastdllm` distribution installs a startup hook
(`fastdllm_lm_eval.pth` -> `_fastdllm_lm_eval_hook`) that adds a lazy "fastdllm" entry to
lm-eval's model registry when lm-eval loads its own models (docs/evaluation.md).

- `generate_until`: requests grouped by their generation kwargs, decoded in batches of
  `batch_size` sorted by prompt length through one engine (`evaluation/decoding.py`); stop
  tokens end a sequence, `until` strings cut the text and end it early, `max_gen_toks` is the
  token budget; with `--apply_chat_template` the prompt is lm-eval's rendered chat.
- `loglikelihood` / `loglikelihood_rolling`: the exact decomposition of
  `evaluation/loglikelihood.py`, in the model's `mode` (AR: causal; diffusion: block-wise left
  to right with the token shift).
- Speed of the run (generated tokens, forwards, tokens/forward, tokens/s) is in `self.speed`,
  logged after every `generate_until` call, and written to `speed_file` when given.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict

import lm_eval.models  # noqa: F401  (lm-eval fills an empty registry with its own models only)
import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from ..atomic import atomic_write_text
from ..errors import FastDLLMError
from ..llm import LLM
from .decoding import Speed, decode
from .loglikelihood import continuation_logprobs

log = logging.getLogger("lm_eval.models.fastdllm")  # shown by lm-eval's logging set-up

_BOOL = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def _as_bool(name: str, value) -> bool:
    if isinstance(value, bool):
        return value
    if str(value).lower() in _BOOL:
        return _BOOL[str(value).lower()]
    raise FastDLLMError(f"{name} must be true or false, got {value!r}", field=name)


@register_model("fastdllm")
class FastDLLMLM(TemplateLM):
    def __init__(self, pretrained: str | None = None, *, llm: LLM | None = None,
                 mode: str | None = None, threshold: float | None = None, rule: str | None = None,
                 block_size: int | None = None, sub_block_size: int | None = None,
                 sub_block_cache=True, batch_size: int | str = 8, max_gen_toks: int = 256,
                 max_length: int | None = None, device: str | None = None, dtype: str | None = None,
                 copies_per_forward: int = 64, speed_file: str | None = None,
                 max_batch_size: int | None = None, **unused):
        super().__init__()
        if unused:
            log.warning("fastdllm: ignoring unknown model_args %s", sorted(unused))
        if (pretrained is None) == (llm is None):
            raise FastDLLMError("give exactly one of pretrained=DIR or llm=LLM", field="pretrained")
        if device and device.startswith("cuda") and not torch.cuda.is_available():
            # lm_eval's --device defaults to cuda; on a machine without one, run on the CPU
            log.warning("fastdllm: device %s asked for but CUDA is not available; using the CPU", device)
            device = "cpu"
        self.llm = llm or LLM.load(pretrained, device=device, dtype=dtype)
        self.params = self.llm.decode_config(
            mode=mode, threshold=None if threshold is None else float(threshold), rule=rule,
            block_size=None if block_size is None else int(block_size),
            sub_block_size=None if sub_block_size is None else int(sub_block_size),
            sub_block_cache=_as_bool("sub_block_cache", sub_block_cache))
        if str(batch_size).startswith("auto"):
            batch_size = max_batch_size or 8  # no memory probing: the engine's cache is sized per batch
        self._batch_size = int(batch_size)
        if self._batch_size < 1:
            raise FastDLLMError(f"batch_size must be >= 1, got {batch_size}", field="batch_size")
        self._max_gen_toks = int(max_gen_toks)
        self._max_length = int(max_length) if max_length else self.llm.context_length
        self.copies_per_forward = int(copies_per_forward)
        self.speed_file = speed_file
        self.speed = Speed()
        self._chat_rendered = False

    # ------------------------------------------------------------------ lm-eval properties
    @property
    def tokenizer(self):
        return self.llm.tokenizer

    @property
    def eot_token_id(self) -> int:
        return self.llm.special.stop_token_ids[0]

    @property
    def prefix_token_id(self) -> int:
        bos = self.llm.tokenizer.bos_token_id
        return bos if bos is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def device(self):
        return next(self.llm.model.parameters()).device

    @property
    def tokenizer_name(self) -> str:
        return str(self.llm.model_dir).replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.llm.tokenizer.chat_template if chat_template else None

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The chat rendered as text; it is then tokenized without adding special tokens again,
        which gives the same ids as `LLM.encode_chat` (transformers renders, then encodes)."""
        self._chat_rendered = True
        return self.llm.tokenizer.apply_chat_template(
            chat_history, tokenize=False, add_generation_prompt=add_generation_prompt,
            continue_final_message=not add_generation_prompt)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        if add_special_tokens is None:
            add_special_tokens = not self._chat_rendered
        return self.llm.tokenizer.encode(string, add_special_tokens=add_special_tokens)

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.llm.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------ scoring
    def _score(self, context: list[int], continuation: list[int]) -> tuple[float, bool]:
        p = self.params
        logp, greedy = continuation_logprobs(
            self.llm.model, context, continuation, mode=p.mode, block_size=p.block_size,
            token_shift=p.token_shift, mask_token_id=self.llm.special.mask_token_id,
            copies_per_forward=self.copies_per_forward)
        return float(logp.sum()), bool(greedy.all())

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        out = []
        for (pair, context, continuation) in tqdm(requests, desc="fastdllm loglikelihood",
                                                  disable=disable_tqdm):
            # keep the right end when too long, as lm-eval's HF model does (the continuation
            # is always scored whole; the context loses its oldest tokens)
            whole = (context + continuation)[-(self.max_length + 1):]
            n_ctx = len(whole) - len(continuation)
            if n_ctx < 1:
                raise FastDLLMError(f"a continuation of {len(continuation)} tokens does not fit the "
                                    f"model's context of {self.max_length}", field="continuation")
            result = self._score(whole[:n_ctx], continuation)
            out.append(result)
            if pair is not None:
                self.cache_hook.add_partial("loglikelihood", pair, result)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        for (text,) in tqdm([r.args for r in requests], desc="fastdllm loglikelihood_rolling",
                            disable=disable_tqdm):
            windows = map(make_disjoint_window, get_rolling_token_windows(
                token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1))
            total = sum(self._score(ctx, cont)[0] for ctx, cont in windows)
            out.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
        return out

    # ------------------------------------------------------------------ generation
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        groups: dict[str, list[int]] = defaultdict(list)
        for i, r in enumerate(requests):
            groups[json.dumps(r.args[1], sort_keys=True, default=str)].append(i)
        results: list[str | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), desc="fastdllm generate_until", disable=disable_tqdm)
        run = Speed()
        for key, idx in groups.items():
            gen_kwargs = dict(requests[idx[0]].args[1])
            until, params = self._generation_params(gen_kwargs)
            budget = max(1, self.max_length - params.max_new_tokens)
            prompts = [self.tok_encode(requests[i].args[0])[-budget:] for i in idx]
            outputs, speed = decode(self.llm, prompts, params, batch_size=self.batch_size,
                                    stop=until, on_batch=bar.update)
            run.add(speed)
            for i, o in zip(idx, outputs):
                results[i] = o.text
                self.cache_hook.add_partial("generate_until", requests[i].args, o.text)
        bar.close()
        self.speed.add(run)
        log.info("fastdllm generate_until: %s (whole run so far: %s)", run.as_dict(), self.speed.as_dict())
        if self.speed_file:
            atomic_write_text(self.speed_file, json.dumps(
                {"mode": self.params.mode, "threshold": self.params.threshold, "rule": self.params.rule,
                 "block_size": self.params.block_size, "sub_block_size": self.params.sub_block_size,
                 "batch_size": self.batch_size, **self.speed.as_dict()}, indent=2) + "\n")
        return results

    def _generation_params(self, gen_kwargs: dict):
        until = gen_kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        max_new = gen_kwargs.pop("max_gen_toks", None) or gen_kwargs.pop("max_new_tokens", None) \
            or self.max_gen_toks
        sample = _as_bool("do_sample", gen_kwargs.pop("do_sample", False))
        temperature = float(gen_kwargs.pop("temperature", 0.0) or 0.0) if sample else 0.0
        overrides = {"max_new_tokens": int(max_new), "temperature": temperature}
        if sample:
            for name in ("top_p", "top_k", "seed"):
                if name in gen_kwargs:
                    overrides[name] = type(getattr(self.params, name) or 0)(gen_kwargs.pop(name))
        return tuple(s for s in until if s), self.llm.decode_config(self.params, **overrides)
