"""Sizing the paged KV cache: `--kv-cache-memory` / `LLM.load(kv_cache_memory=...)` in bytes,
with units, or as a fraction of free memory; bad values are refused naming the field."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from fastdllm.engine.params import DEFAULT_CPU_BYTES, CacheConfig, parse_memory
from fastdllm.errors import FastDLLMError


@pytest.mark.parametrize("text, value", [("1073741824", 1 << 30), ("4GiB", 4 << 30), ("512MiB", 512 << 20),
                                         ("1.5G", int(1.5 * (1 << 30))), ("2GB", 2 * 10**9),
                                         ("0.5", 0.5), ("64k", 64 << 10)])
def test_parse_memory(text, value):
    assert parse_memory(text) == value


@pytest.mark.parametrize("text", ["", "lots", "4 parsecs", "nan", "inf", "-1GiB"])
def test_bad_memory_is_refused(text):
    with pytest.raises(FastDLLMError) as e:
        CacheConfig(parse_memory(text))
    assert e.value.field == "kv_cache_memory"


def test_budget_rules():
    cpu = torch.device("cpu")
    assert CacheConfig().budget(cpu) == DEFAULT_CPU_BYTES
    assert CacheConfig(12345).budget(cpu) == 12345
    assert 0 < CacheConfig(0.25).budget(cpu) < CacheConfig(0.5).budget(cpu)
    for bad in (0, -3, 1.5, True, "4GiB"):
        with pytest.raises(FastDLLMError, match="kv_cache_memory"):
            CacheConfig(bad)
    with pytest.raises(FastDLLMError, match="prefix_caching"):
        CacheConfig(prefix_caching="yes")


def test_cli_flag_names_itself():
    r = subprocess.run([sys.executable, "-m", "fastdllm.cli", "generate", "--model", "x",
                        "--kv-cache-memory", "lots", "--prompt", "hi"], capture_output=True, text=True)
    assert r.returncode == 2 and "--kv-cache-memory takes bytes" in r.stderr
