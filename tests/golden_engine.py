"""Golden outputs of the engine for every decoding mode, on the shipped models.

`python tests/golden_engine.py` records them into tests/data/engine_golden.json; the test
(test_engine_paged.py) decodes the same cases with today's engine and requires the same tokens.
They were first recorded with the engine that preallocated one contiguous slot per sequence
(before the paged KV cache, commit 5bb25e8), so the test pins that the paged cache, prefix
caching and preemption change no token in fp32 on the CPU.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "data" / "engine_golden.json"
AR, DIFF = ROOT / "models" / "fastdllm-wp-ar", ROOT / "models" / "fastdllm-wp-diffusion"

QUESTIONS = [
    "Mia buys 3 pens for 4 dollars each and pays with 20 dollars. How much change does she get?",
    "A farmer has 12 cows and buys 5 more. Then 3 cows are sold. How many cows are left?",
    "Tom reads 15 pages a day for 4 days. How many pages does he read?",
]

# (name, model, draft, settings) - draft: None, "ar-target" (AR model verifies the diffusion
# model's drafts) or "self" (self-speculative on the model)
CASES = [
    ("diffusion-default", "diffusion", {}),
    ("diffusion-threshold", "diffusion", {"rule": "threshold"}),
    ("diffusion-entropy", "diffusion", {"rule": "entropy_bounded", "threshold": 0.5}),
    ("diffusion-no-subcache", "diffusion", {"sub_block_cache": False}),
    ("diffusion-block16", "diffusion", {"block_size": 16, "sub_block_size": 4}),
    ("diffusion-t07", "diffusion", {"threshold": 0.7, "rule": "threshold"}),
    # the official sampler's confidences: what the engine before paging read (5bb25e8)
    ("diffusion-sampled", "diffusion", {"temperature": 0.8, "top_p": 0.95, "seed": 7,
                                        "confidence": "sampler"}),
    ("ar-on-diffusion", "diffusion", {"mode": "ar"}),
    ("ar-model", "ar", {"mode": "ar"}),
    ("ar-sampled", "ar", {"mode": "ar", "temperature": 0.8, "top_k": 20, "seed": 3}),
    ("spec-pair-reuse", "pair", {"mode": "speculative"}),
    ("spec-pair-block", "pair", {"mode": "speculative", "draft_cache": "block"}),
    ("spec-self", "self", {"mode": "speculative"}),
    ("spec-self-merged", "self", {"mode": "speculative", "merged": True}),
]
MAX_NEW = 48
KW: dict = {}  # LLM.load options of the run (the test runs both prefix-caching settings)


def prompts(llm) -> list[list[int]]:
    chats = [llm.encode_chat([{"role": "user", "content": q}]) for q in QUESTIONS]
    long = (chats[0] + chats[1])[:64]  # exactly two blocks: the prefill draws the first token
    return chats + [long, chats[2][:5]]


def load(which: str):
    from fastdllm import LLM

    if which == "pair":
        return LLM.load(AR, draft_model=DIFF, **KW)
    return LLM.load(AR if which == "ar" else DIFF, **KW)


def mixed_batch(llm) -> list[list[int]]:
    """One batch mixing modes and settings on one engine, each sequence its own settings."""
    settings = [dict(s) for _, m, s in CASES if m == "diffusion"]
    ids = prompts(llm)
    params = [llm.decode_config(max_new_tokens=MAX_NEW, **s) for s in settings]
    engine = llm.engine(len(params), max(p.cache_len(max(map(len, ids))) for p in params), 32)
    seqs = [engine.add(ids[i % len(ids)], p) for i, p in enumerate(params)]
    for _ in engine.stream():
        pass
    return [s.output_ids() for s in seqs]


def record() -> dict:
    out = {}
    models = {}
    for name, which, settings in CASES:
        llm = models.setdefault(which, load("diffusion" if which == "self" else which))
        ids = prompts(llm)
        single = [llm.generate(x, max_new_tokens=MAX_NEW, **settings).token_ids for x in ids]
        batch = [r.token_ids for r in llm.generate_batch(ids, max_new_tokens=MAX_NEW, **settings)]
        out[name] = {"single": single, "batch": batch}
        print(name, [len(x) for x in single], file=sys.stderr)
    out["mixed-batch"] = {"batch": mixed_batch(models["diffusion"])}
    return out


if __name__ == "__main__":
    import torch

    torch.set_num_threads(1)
    GOLDEN.write_text(json.dumps(record()) + "\n")
    print(f"wrote {GOLDEN}")
