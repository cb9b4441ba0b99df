"""Helpers of the gsm8k_local lm-eval task (loaded by lm-eval's `!function`)."""

from __future__ import annotations


def load_local_jsonl(data_file: str | None = None, **_metadata):
    """The `test` split from the JSONL file given as lm-eval metadata `data_file`, through
    `datasets`' json builder (`dataset_path: json`), checked with fastdllm's reader first so a
    bad row is reported by file and line."""
    import datasets

    from fastdllm.errors import FastDLLMError
    from fastdllm.tasks import read_gsm8k_jsonl

    if not data_file:
        raise FastDLLMError("the gsm8k_local task needs its data file: pass "
                            "--metadata '{\"data_file\": \"PATH/test.jsonl\"}' to lm_eval "
                            "(or metadata={'data_file': ...} to TaskManager)", field="data_file")
    read_gsm8k_jsonl(data_file)
    return datasets.load_dataset("json", data_files={"test": str(data_file)})


def process_results(doc: dict, results: list[str]) -> dict:
    from fastdllm.tasks import is_correct

    return {"exact_match": float(is_correct(results[0], doc["answer"]))}
