"""What one wide request costs its batch peers (issue 21, class 7): the median step time of four
rows, three at the defaults and one asking for a wider shape, on the shipped model (CPU, one
thread). The table in docs/serving.md ("Per-step cost") comes from:

    PYTHONPATH=src python benchmarks/bench_step_cost.py
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from fastdllm import LLM

MODEL = Path(__file__).resolve().parents[1] / "models" / "fastdllm-wp-diffusion"
QUESTION = "Mia buys 3 pens for 4 dollars each and pays with 20 dollars. How much change does she get?"


def step_ms(llm: LLM, ids: list[int], base: dict, wide: dict, steps: int = 25) -> float:
    engine = llm.new_engine(4, 512, 64, speculative=base.get("mode") == "speculative")
    for i in range(4):
        engine.add(ids, llm.decode_config(max_new_tokens=128, **{**base, **(wide if i == 3 else {})}),
                   stop_token_ids=())
    times = []
    while engine.running and len(times) < steps:
        t = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t)
    engine.close()
    return 1000 * statistics.median(times[2:])  # the first steps prefill


def main() -> None:
    torch.set_num_threads(1)
    llm = LLM.load(MODEL, device="cpu")
    ids = llm.encode_chat([{"role": "user", "content": QUESTION}])
    merged, spec = dict(mode="speculative", merged=True, draft_length=8), dict(mode="speculative", draft_length=8)
    cases = [("diffusion, defaults", {}, {}),
             ("diffusion, block_size 64", {}, dict(block_size=64)),
             ("diffusion, block 64, sub-block 64, threshold 1.0", {}, dict(block_size=64, sub_block_size=64, threshold=1.0)),
             ("diffusion, block 128, sub-block 128, threshold 1.0", {}, dict(block_size=128, sub_block_size=128, threshold=1.0)),
             ("merged, draft_length 8", merged, {}),
             ("merged, draft_length 16", merged, dict(draft_length=16)),
             ("merged, draft_length 32", merged, dict(draft_length=32)),
             ("self-speculative, draft_length 8", spec, {}),
             ("self-speculative, draft_length 16", spec, dict(draft_length=16))]
    print("| the fourth request | step (ms) |\n|---|---|")
    for name, base, wide in cases:
        print(f"| {name} | {step_ms(llm, ids, base, wide):.1f} |", flush=True)


if __name__ == "__main__":
    main()
