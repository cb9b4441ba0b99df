"""`fastdllm generate` as a user runs it: a real subprocess per case (each loads torch, so the
cases are few), compared with the Python API in this process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from fastdllm import LLM

SMALL = ["--block-size", "8", "--sub-block-size", "4", "--max-new-tokens", "12"]
PROMPT = "Once upon a time"


class Run:
    """A started `fastdllm generate` subprocess; `.result()` waits for it."""

    def __init__(self, *args: str):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fastdllm.cli", "generate", "--device", "cpu", *map(str, args)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=dict(os.environ, OMP_NUM_THREADS="1"))  # tiny models: threads only contend
        self.done: subprocess.CompletedProcess | None = None

    def result(self) -> subprocess.CompletedProcess:
        if self.done is None:
            out, err = self.proc.communicate(timeout=180)
            self.done = subprocess.CompletedProcess(self.proc.args, self.proc.returncode, out, err)
        return self.done


@pytest.fixture(scope="module")
def runs(qwen2_ckpt, no_tokenizer_ckpt) -> dict[str, Run]:
    """Every CLI run of this module, started at once (each spends seconds importing torch)."""
    base = ["--model", qwen2_ckpt, "--prompt", PROMPT]
    started = {
        # the default diffusion decode (both caches on), with the trace
        "json": Run(*base, *SMALL, "--json", "--trace"),
        "no_block_cache": Run(*base, *SMALL, "--threshold", "0.7", "--no-sub-block-cache",
                              "--no-block-cache", "--json"),
        # AR, token-id prompt, plain (not --json) output, on a checkpoint without tokenizer
        "ar_ids": Run("--model", no_tokenizer_ckpt, "--prompt-ids", "5, 6,7,8", "--mode", "ar",
                      "--max-new-tokens", "12"),
        "bad_threshold": Run(*base, "--threshold", "1.5"),
        "rule": Run(*base, *SMALL, "--rule", "left_anchored", "--threshold", "0.5", "--json"),
    }
    yield started
    for run in started.values():
        if run.proc.poll() is None:
            run.proc.kill()
            run.proc.wait()


@pytest.fixture(scope="module")
def qwen2(qwen2_ckpt) -> LLM:
    return LLM.load(qwen2_ckpt, device="cpu")


def parse_json(run: subprocess.CompletedProcess) -> dict:
    assert run.returncode == 0, run.stderr
    lines = run.stdout.strip().splitlines()
    assert len(lines) == 1, run.stdout  # one JSON object, nothing else on stdout
    return json.loads(lines[0])


def test_json_output(runs, qwen2):
    out = parse_json(runs["json"].result())
    for key in ("token_ids", "text", "finish_reason", "forward_calls", "new_tokens",
                "tokens_per_forward", "seconds", "trace"):
        assert key in out, key
    expected = qwen2.generate(PROMPT, block_size=8, sub_block_size=4, max_new_tokens=12, trace=True)
    assert out["token_ids"] == expected.token_ids
    assert out["text"] == expected.text
    assert out["new_tokens"] == len(out["token_ids"])
    assert out["forward_calls"] == expected.stats["forward_calls"]
    assert out["mode"] == "diffusion" and out["seconds"] > 0
    assert [s["positions"] for s in out["trace"]] == [s["positions"] for s in expected.trace]


def test_no_block_cache_gives_the_same_tokens(runs, qwen2):
    reference = parse_json(runs["no_block_cache"].result())
    expected = qwen2.generate(PROMPT, block_size=8, sub_block_size=4, max_new_tokens=12,
                              threshold=0.7, sub_block_cache=False)
    assert reference["token_ids"] == expected.token_ids  # == the block-cached decode
    assert reference["forward_calls"] == expected.stats["forward_calls"]


def test_rule_option_picks_the_decoding_rule(runs, qwen2):
    out = parse_json(runs["rule"].result())
    expected = qwen2.generate(PROMPT, block_size=8, sub_block_size=4, max_new_tokens=12,
                              rule="left_anchored", threshold=0.5)
    assert out["token_ids"] == expected.token_ids
    assert out["forward_calls"] == expected.stats["forward_calls"]


def test_ar_mode_with_prompt_ids_without_tokenizer(runs, qwen2):
    run = runs["ar_ids"].result()
    assert run.returncode == 0, run.stderr
    # same weights as the qwen2 fixture; no tokenizer, so the token ids are printed
    expected = qwen2.generate([5, 6, 7, 8], mode="ar", max_new_tokens=12)
    assert run.stdout == f"{expected.token_ids}\n"
    summary = run.stderr.strip().splitlines()[-1]
    n = len(expected.token_ids)
    assert summary.startswith(f"[ar] {n} tokens, {n} forwards, 1.00 tokens/forward"), summary
    assert summary.endswith(f"finish: {expected.finish_reason}")


def test_bad_input_exits_2_with_one_line(runs):
    run = runs["bad_threshold"].result()
    assert run.returncode == 2
    assert run.stdout == ""
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: threshold must be in (0, 1]"), run.stderr
    assert "Traceback" not in run.stderr
