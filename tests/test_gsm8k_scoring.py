"""GSM8K answer extraction and scoring, on hand-made outputs and the real test file."""

from __future__ import annotations

from pathlib import Path

import pytest

from fastdllm.errors import FastDLLMError
from fastdllm.tasks.gsm8k import (extract_answer, extract_reference, format_prompt, is_correct,
                                  read_gsm8k_jsonl, score)

GSM8K_TEST = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k" / "test.jsonl"


@pytest.mark.parametrize("text, expected", [
    ("3 * 4 = 12\n#### 12", "12"),
    ("#### 1,234", "1234"),
    ("#### $1,234,567", "1234567"),
    ("#### 18.", "18"),
    ("####   42   ", "42"),
    ("#### 42 apples and more text", "42"),
    ("#### 42\nextra line after the answer", "42"),
    ("#### -3", "-3"),
    ("#### - 3", "-3"),
    ("#### -$3", "-3"),
    ("#### 2.50", "2.5"),
    ("#### 7.0", "7"),
    ("#### .5", "0.5"),
    ("#### 0.125", "0.125"),
    ("#### 1 #### 2", "2"),  # the last marker wins
    ("#### 5\nwait, no\n#### 6", "6"),
    ("####7", "7"),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize("text", [
    "", "12", "the answer is 12", "3 * 4 = 12", "####", "#### ", "#### twelve", "#### -",
    "#### 12 #### none",  # last marker has no number
    "#### $",
])
def test_extract_answer_none(text):
    assert extract_answer(text) is None


def test_reference_without_number_raises():
    assert extract_reference("1 + 1 = 2\n#### 2") == "2"
    with pytest.raises(FastDLLMError):
        extract_reference("no marker here")


def test_is_correct_and_score():
    refs = ["#### 12", "#### 1,000", "#### 2.5", "#### 3"]
    preds = ["12 apples\n#### 12", "#### 1000.00", "#### 2.50 dollars", "the answer is 3"]
    assert [is_correct(p, r) for p, r in zip(preds, refs)] == [True, True, True, False]
    assert score(preds, refs) == {"accuracy": 0.75, "correct": 3, "total": 4}
    assert score([], []) == {"accuracy": 0.0, "correct": 0, "total": 0}
    with pytest.raises(FastDLLMError):
        score(["#### 1"], [])


def test_format_prompt_is_the_question():
    assert format_prompt("  How many apples?\n") == "How many apples?"


def test_read_errors_name_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "#### 1"}\n\n{not json}\n')
    with pytest.raises(FastDLLMError, match=r"bad\.jsonl:3: not valid JSON"):
        read_gsm8k_jsonl(bad)
    bad.write_text('{"question": "q", "answer": "#### 1"}\n{"question": "q"}\n')
    with pytest.raises(FastDLLMError, match=r"bad\.jsonl:2: 'answer' is missing"):
        read_gsm8k_jsonl(bad)
    bad.write_text('[1, 2]\n')
    with pytest.raises(FastDLLMError, match=r"bad\.jsonl:1: expected a JSON object"):
        read_gsm8k_jsonl(bad)
    with pytest.raises(FastDLLMError, match="missing.jsonl"):
        read_gsm8k_jsonl(tmp_path / "missing.jsonl")


@pytest.mark.skipif(not GSM8K_TEST.is_file(), reason=f"{GSM8K_TEST} not present")
def test_real_gsm8k_references_score_perfectly():
    rows = read_gsm8k_jsonl(GSM8K_TEST)
    assert len(rows) == 1319
    refs = [r["answer"] for r in rows]
    for ref in refs:
        value = extract_reference(ref)
        float(value)  # a number
    assert score(refs, refs) == {"accuracy": 1.0, "correct": 1319, "total": 1319}
