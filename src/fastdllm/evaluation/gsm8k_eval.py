"""`fastdllm eval`: a model on a GSM8K-format JSONL file (question / answer with `####`),
scored with `fastdllm.tasks.score`, with a 95% Wilson interval and the run's decoding speed;
optionally the same problems in AR mode beside it (`compare_ar`).

Prompts follow the paper's GSM8K setting: the bare question as the user turn of the chat
template (`tasks.format_prompt`). With `num_fewshot = K`, the first K rows of the file are the
exemplars, given as earlier user / assistant turns (lm-eval's `--fewshot_as_multiturn`
layout), and the problems evaluated are the rows after them, so no exemplar is ever scored.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from ..errors import FastDLLMError
from ..tasks import extract_answer, format_prompt, is_correct, read_gsm8k_jsonl
from .aup import aup
from .decoding import decode
from .report import wilson_interval


@dataclass(frozen=True)
class EvalConfig:
    data: Path
    limit: int | None = None  # problems after the exemplars; None = all
    num_fewshot: int = 0
    batch_size: int = 8
    progress: bool = True

    def __post_init__(self):
        if self.limit is not None and self.limit < 1:
            raise FastDLLMError(f"limit must be >= 1, got {self.limit}", field="limit")
        if self.num_fewshot < 0:
            raise FastDLLMError(f"num_fewshot must be >= 0, got {self.num_fewshot}", field="num_fewshot")
        if self.batch_size < 1:
            raise FastDLLMError(f"batch_size must be >= 1, got {self.batch_size}", field="batch_size")


def split_rows(rows: list[dict], cfg: EvalConfig) -> tuple[list[dict], list[dict]]:
    """(exemplars, problems) of the file's rows."""
    exemplars, problems = rows[:cfg.num_fewshot], rows[cfg.num_fewshot:]
    if cfg.limit is not None:
        problems = problems[:cfg.limit]
    if not problems:
        raise FastDLLMError(f"{cfg.data} has {len(rows)} rows: none is left to evaluate after "
                            f"{cfg.num_fewshot} few-shot exemplars", field="data")
    return exemplars, problems


def chat_messages(question: str, exemplars: list[dict]) -> list[dict]:
    messages = []
    for ex in exemplars:
        messages += [{"role": "user", "content": format_prompt(ex["question"])},
                     {"role": "assistant", "content": ex["answer"].strip()}]
    return messages + [{"role": "user", "content": format_prompt(question)}]


def run_model(llm, problems: list[dict], exemplars: list[dict], cfg: EvalConfig, *, name: str,
              model: str, **decode_overrides) -> dict:
    """Decode every problem once and score it: one entry of the result's `runs`."""
    params = llm.decode_config(**decode_overrides)
    prompts = [llm.encode_chat(chat_messages(p["question"], exemplars)) for p in problems]
    with tqdm(total=len(prompts), desc=name, unit="problem", disable=not cfg.progress) as bar:
        outputs, speed = decode(llm, prompts, params, batch_size=cfg.batch_size, on_batch=bar.update)
    texts = [o.text for o in outputs]
    correct = [is_correct(t, p["answer"]) for t, p in zip(texts, problems)]
    n_ok, total = sum(correct), len(problems)
    lo, hi = wilson_interval(n_ok, total)
    return {
        "name": name, "model": model, "mode": params.mode, "threshold": params.threshold,
        "rule": params.rule,
        "block_size": params.block_size, "sub_block_size": params.sub_block_size,
        "max_new_tokens": params.max_new_tokens,
        "accuracy": n_ok / total, "correct": n_ok, "total": total, "accuracy_ci95": [lo, hi],
        "speed": speed.as_dict(),
        "outputs": [{"index": i, "prediction": extract_answer(t), "correct": ok, "text": t,
                     "generated_tokens": len(o.token_ids), "forwards": o.forward_calls,
                     "finish_reason": o.finish_reason}
                    for i, (t, ok, o) in enumerate(zip(texts, correct, outputs))],
    }


def evaluate(llm, cfg: EvalConfig, *, model: str, ar_llm=None, ar_model: str | None = None,
             compare_ar: bool = False, device: str = "cpu", sweep: tuple[float, ...] = (),
             **decode_overrides) -> dict:
    """The full result of `fastdllm eval` (what --json writes). `sweep`: more thresholds, each
    one more run with the same settings; the result then has a `frontier`: accuracy against
    tokens per forward of the diffusion runs and its AUP (evaluation/aup.py)."""
    rows = read_gsm8k_jsonl(cfg.data)
    exemplars, problems = split_rows(rows, cfg)
    first = run_model(llm, problems, exemplars, cfg, name=llm.decode_config(mode=decode_overrides.get("mode")).mode,
                      model=model, **decode_overrides)
    runs = [first]
    for t in sweep:
        runs.append(run_model(llm, problems, exemplars, cfg, name=f"threshold {t:g}", model=model,
                              **{**decode_overrides, "threshold": t}))
    if compare_ar:
        ar_overrides = {k: v for k, v in decode_overrides.items()
                        if k in ("max_new_tokens", "temperature", "top_p", "top_k", "seed")}
        runs.append(run_model(ar_llm or llm, problems, exemplars, cfg, name="ar",
                              model=ar_model or model, mode="ar", **ar_overrides))
    result = {"data": str(cfg.data), "problems": len(problems), "num_fewshot": cfg.num_fewshot,
              "batch_size": cfg.batch_size, "max_new_tokens": first["max_new_tokens"],
              "device": device, "runs": runs}
    if compare_ar and runs[-1]["speed"]["tokens_per_second"]:
        result["speedup_vs_ar"] = round(first["speed"]["tokens_per_second"]
                                        / runs[-1]["speed"]["tokens_per_second"], 3)
    if sweep:
        result["frontier"] = frontier(runs)
    return result


def frontier(runs: list[dict]) -> dict:
    """Accuracy (%) against tokens per forward of the diffusion runs, and their AUP with y_max
    the best accuracy of every run (the AR run's included)."""
    points = [(r["speed"]["tokens_per_forward"], 100 * r["accuracy"], r["threshold"])
              for r in runs if r["mode"] == "diffusion"]
    y_max = 100 * max(r["accuracy"] for r in runs)
    return {"points": [{"tokens_per_forward": x, "accuracy": y, "threshold": t} for x, y, t in sorted(points)],
            "y_max": y_max, "aup": aup([(x, y) for x, y, _ in points], y_max=y_max)}
