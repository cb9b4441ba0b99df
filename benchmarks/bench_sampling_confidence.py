"""Which probability the threshold reads for a *sampled* diffusion token (issue 21, class 10):
its probability under the model's own distribution ("model", the default) or under the
tempered / top-k / top-p distribution it was drawn from ("sampler", the official sampler).

    python benchmarks/bench_sampling_confidence.py --val-file runs/shipped/data/sft_val.jsonl --limit 100

Decodes the first `--limit` validation problems (never test) with the shipped adapted model at
its default decoding (left-anchored, threshold 0.9), greedy and sampled (temperature 0.01,
top_k 1, temperature 0.7; seed 1), both confidence sources; writes
docs/results/sampling_confidence_val.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_adaptation import evaluate  # noqa: E402
from common import machine_info, write_results  # noqa: E402

from fastdllm import LLM  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = [("greedy", {})] + [
    (f"{label} {source}", dict(kw, seed=1, confidence=source))
    for label, kw in (("temperature 0.01", dict(temperature=0.01)),
                      ("top_k 1", dict(temperature=1.0, top_k=1)),
                      ("temperature 0.7", dict(temperature=0.7)))
    for source in ("model", "sampler")]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=ROOT / "models" / "fastdllm-wp-diffusion")
    ap.add_argument("--val-file", type=Path, default=Path("runs/shipped/data/sft_val.jsonl"))
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "sampling_confidence_val")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    problems = [json.loads(line) for line in args.val_file.read_text().splitlines()[: args.limit]]
    problems = [{"prompt": p["prompt"], "answer": p["response"]} for p in problems]
    llm = LLM.load(args.model, prefix_caching=False)
    rows = []
    for name, kw in SETTINGS:
        r = evaluate(llm, problems, 50, 128, name, **kw)
        rows.append({"setting": name, "accuracy": r["accuracy"], "tokens_per_forward": r["tokens_per_forward"],
                     "new_tokens": r["new_tokens"], "forward_calls": r["forward_calls"]})
        print(rows[-1], flush=True)
    write_results(args.out, "Sampled diffusion decoding: which confidence the threshold reads (val split)",
                  machine_info("cpu"), [("Accuracy and tokens per forward", rows,
                                         ["setting", "accuracy", "tokens_per_forward", "new_tokens", "forward_calls"])],
                  {"limit": args.limit, "rows": rows},
                  notes=f"Regenerate: `python benchmarks/bench_sampling_confidence.py --val-file <sft_val.jsonl> "
                        f"--limit {args.limit}`. Shipped adapted model, left-anchored rule, threshold 0.9, "
                        "max 128 new tokens, batch 50, first problems of the validation split.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
