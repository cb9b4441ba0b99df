"""Tasks the shipped model is trained and evaluated on.

`word_problems` generates our synthetic grade-school math problems; `gsm8k` owns the GSM8K
answer convention (`#### <number>`), prompts and scoring, shared by our data and real GSM8K.
"""

from .gsm8k import extract_answer, extract_reference, format_prompt, is_correct, read_gsm8k_jsonl, score
from .word_problems import FAMILIES, SHIPPED_SPLIT, Problem, generate_problems, make_splits, write_jsonl

__all__ = ["FAMILIES", "SHIPPED_SPLIT", "Problem", "extract_answer", "extract_reference", "format_prompt",
           "generate_problems", "is_correct", "make_splits", "read_gsm8k_jsonl", "score",
           "write_jsonl"]
