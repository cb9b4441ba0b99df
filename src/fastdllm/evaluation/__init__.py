"""Evaluation the way the field does it: GSM8K-style accuracy with confidence intervals and
decoding speed (`fastdllm eval`), exact continuation log-likelihoods, and an lm-evaluation-harness
model (`lm_eval --model fastdllm`, see harness.py and docs/evaluation.md).

Importing this package does not import lm_eval; only `fastdllm.evaluation.harness` does.
"""

from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent / "tasks"  # lm-eval task YAMLs (--include_path)
