"""The GSM8K convention: prompts, final-answer extraction and scoring.

Shared by our synthetic word problems (`word_problems.py`) and the real GSM8K files (Cobbe et
al. 2021, the benchmark of the Fast-dLLM v2 paper's math evaluation). A solution ends with a
line `#### <number>`; the answer is the number after the LAST `####`, normalised so that
`1,234`, `$1234` and `1234.00` all read `1234`.

Predictions are scored strictly: an output without `####` (or without a number after it) is
wrong, never rescued by guessing its last number, because our models are trained to end with
that line and a lenient rule would hide a model that has not learned to.

Prompt decision: `format_prompt` returns the plain question, without an instruction suffix such
as "Let's think step by step". Our training data puts the bare question in the user turn and the
model learns the answer layout from the data, so evaluation must ask the same way; the model's
chat template wraps the question in the user turn.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from decimal import Decimal, InvalidOperation

from ..errors import FastDLLMError
from ..jsonl import read_jsonl

_MARKER = "####"
# A number as people write one: optional sign, digits with thousands commas, optional decimals;
# `.5` too. `$` and spaces are removed before matching, so `$ 1,234` and `- 3` still read.
_NUMBER = re.compile(r"-?(?:\d[\d,]*(?:\.\d+)?|\.\d+)")


def _normalise(number: str) -> str | None:
    try:
        value = Decimal(number.replace(",", ""))
    except InvalidOperation:
        return None
    if value == value.to_integral_value():
        return str(int(value))  # 7.0 -> 7, -0 -> 0
    return format(value.normalize(), "f")  # 2.50 -> 2.5, never 2.5E+1 style


def extract_answer(text: str) -> str | None:
    """The normalised number after the last `####` in `text`, or None when there is no `####`
    or no number follows it. Text after the number (units, a period, more words) is ignored."""
    at = text.rfind(_MARKER)
    if at < 0:
        return None
    tail = text[at + len(_MARKER):].replace("$", "")
    tail = re.sub(r"(?<=-)\s+", "", tail.lstrip())  # "- 3" -> "-3"
    match = _NUMBER.match(tail)
    return _normalise(match.group()) if match else None


def extract_reference(answer: str) -> str:
    """The reference answer of a dataset row (same rules as `extract_answer`); a row without one
    is a broken dataset, so this raises instead of returning None."""
    ref = extract_answer(answer)
    if ref is None:
        raise FastDLLMError(f"reference answer has no number after '####': {answer[-80:]!r}")
    return ref


def is_correct(prediction_text: str, reference_answer: str) -> bool:
    pred = extract_answer(prediction_text)
    return pred is not None and pred == extract_reference(reference_answer)


def score(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float | int]:
    """Exact-match accuracy of the final answers: {"accuracy", "correct", "total"}."""
    if len(predictions) != len(references):
        raise FastDLLMError(f"{len(predictions)} predictions for {len(references)} references; "
                            "score one prediction per reference")
    correct = sum(is_correct(p, r) for p, r in zip(predictions, references))
    total = len(references)
    return {"accuracy": correct / total if total else 0.0, "correct": correct, "total": total}


def read_gsm8k_jsonl(path: str | os.PathLike) -> list[dict]:
    """Rows of a GSM8K-style JSONL file, each an object with string `question` and `answer`
    (other keys are kept). Blank lines are skipped; anything else malformed is an error that
    names the file and line."""
    rows = []
    for lineno, row in read_jsonl(path, expected="with 'question' and 'answer'",
                                  missing_hint="pass the path of a GSM8K-style JSONL file"):
        for key in ("question", "answer"):
            if not isinstance(row.get(key), str):
                problem = "is missing" if key not in row else "is not a string"
                raise FastDLLMError(f"{path}:{lineno}: '{key}' {problem}")
        rows.append(row)
    return rows


def format_prompt(question: str) -> str:
    """The user-turn text for a question: the question itself (see the module docstring)."""
    return question.strip()
