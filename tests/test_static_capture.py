"""What a CUDA graph relies on, shown on the CPU with the static step run eagerly (issue 20).

A captured graph reads and writes fixed addresses: every tensor a static step reads that the
step did not make itself (weights, KV cache, RoPE tables, masks' constants, the input buffer) must
stay where it was at capture for as long as the graph lives. And an engine that is replaced must
free its graphs and cache at once, not when the garbage collector next runs."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from fastdllm import LLM
from fastdllm.engine.params import RunnerConfig

pytestmark = pytest.mark.usefixtures("one_thread")

B = 8


class ExternalReads(TorchDispatchMode):
    """The storages the recorded code reads but did not make: what a CUDA graph captured of it
    by address."""

    def __init__(self):
        super().__init__()
        self.made: set[int] = set()
        self.read: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        for t in tree_leaves((args, kwargs or {})):
            if isinstance(t, torch.Tensor) and t.untyped_storage().nbytes():
                ptr = t.untyped_storage().data_ptr()
                if ptr not in self.made:
                    self.read.add(ptr)
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().nbytes():
                self.made.add(t.untyped_storage().data_ptr())
        return out


def external_reads(shape) -> set[int]:
    with torch.inference_mode(), ExternalReads() as rec:
        shape.step()
    return rec.read


@pytest.fixture(scope="module")
def llm(checkpoint_factory) -> LLM:
    base = LLM.load(checkpoint_factory("qwen2"), device="cpu")
    return LLM(base.model, base.tokenizer, base.model_dir, base.special, default_block_size=B,
               runner=RunnerConfig(cpu_static="eager"))


def test_a_static_step_reads_the_same_memory_after_a_self_speculative_engine_grows_rope(llm):
    """Issue 20, defect 1: building a self-speculative engine after a plain one asks the model
    for longer RoPE tables (the merged form's room past the context); the tables a plain
    engine's graphs captured must not be the ones that get replaced."""
    context = llm.context_length
    plain = llm.new_engine(2, context, B)
    shape = plain.runner.static.shape((1, 1, plain.runner.static.key_lens[-1]))
    before = external_reads(shape)
    assert external_reads(shape) == before  # the recorder itself is stable
    rope_rows = llm.model.rope_tables(1)[0].shape[0]
    llm.new_engine(2, context, B, speculative=True)
    assert llm.model.rope_tables(1)[0].shape[0] > rope_rows  # the model's tables did grow
    assert external_reads(shape) == before
