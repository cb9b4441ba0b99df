"""What a CUDA graph relies on, shown on the CPU with the static step run eagerly (issue 20).

A captured graph reads and writes fixed addresses: every tensor a static step reads that the
step did not make itself (weights, KV cache, RoPE tables, masks' constants, the input buffer) must
stay where it was at capture for as long as the graph lives. And an engine that is replaced must
free its graphs and cache at once, not when the garbage collector next runs."""

from __future__ import annotations

import shutil

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from fastdllm import LLM
from fastdllm.engine.params import RunnerConfig
from fastdllm.engine.static_step import StaticShape

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


def test_a_replaced_engine_frees_its_cache_without_the_garbage_collector(llm):
    """Issue 20, defect 6: an engine replaced by a bigger one frees its static steps and cache
    at once (before the new one allocates), not when the collector next runs."""
    import gc
    import weakref

    llm.generate([5, 6, 7, 8], max_new_tokens=8)
    old = weakref.ref(llm._engine.cache.k)
    gc.collect()
    gc.disable()
    try:
        # more sequences than the engine's batch places: a new engine replaces it
        llm.generate_batch([[5, 6, 7, 8]] * 3, max_new_tokens=8)
        assert old() is None
    finally:
        gc.enable()


def compiled_llm(llm: LLM, **runner) -> LLM:
    return LLM(llm.model, llm.tokenizer, llm.model_dir, llm.special, default_block_size=B,
               runner=RunnerConfig(cpu_static="compile", **runner))


def test_shapes_are_prepared_most_used_first_and_one_that_fails_runs_eagerly(llm, monkeypatch):
    """Issue 20, defect 6: warm-up prepares the small shapes (short keys, small batches: what
    every sequence and every light load passes through) first, so a time cap drops the large
    ones; a shape whose capture runs out of memory runs eagerly and the others are still
    prepared. The preparation itself is replaced here by a record of the order (one shape
    raising the out-of-memory error a capture would): what is tested is the warm-up's loop."""
    from fastdllm.engine.static_step import StaticSteps

    order = []

    def prepare(self, shape):
        order.append((shape.width, shape.batch, shape.key_len))
        if order[-1] == (8, 1, 64):
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    monkeypatch.setattr(StaticSteps, "_prepare", prepare)
    engine = compiled_llm(llm).new_engine(2, 128, B)
    static = engine.runner.static
    assert len(order) == len(static.widths) * len(static.batches) * len(static.key_lens)
    cost = [w * n * k for w, n, k in order]
    assert cost == sorted(cost) and order[0] == (1, 1, 64)
    assert static.ready == set(order) - {(8, 1, 64)}
    rows_at = {}
    for w in static.widths:  # the failed shape is left to the eager step; its neighbours not
        rows_at[w] = static.shape_for([(_Seq(), _Plan(w))])
    assert rows_at == {1: (1, 1, 64), 8: None, 32: (32, 1, 64)}


def test_the_time_cap_keeps_the_smallest_shapes(llm, monkeypatch):
    from fastdllm.engine.static_step import StaticSteps

    clock = iter(range(1000))
    monkeypatch.setattr(StaticSteps, "_prepare", lambda self, shape: None)
    monkeypatch.setattr("fastdllm.engine.static_step.time.perf_counter", lambda: float(next(clock)))
    engine = compiled_llm(llm, warmup_seconds=3).new_engine(2, 128, B)
    static = engine.runner.static
    every = {(w, n, k) for w in static.widths for n in static.batches for k in static.key_lens}
    assert 0 < len(static.ready) < len(every)
    cost = lambda shape: shape[0] * shape[1] * shape[2]  # noqa: E731
    assert max(map(cost, static.ready)) <= min(map(cost, every - static.ready))


class _Params:
    greedy = True


class _Seq:
    params = _Params()


class _Plan:
    def __init__(self, width: int):
        self.start, self.end, self.key_len = 0, width, 40
        self.logit_positions = [width - 1]


def test_one_sampled_row_and_the_entropy_rule_keep_the_batch_on_static_steps(llm):
    """Issue 20, defect 2: the static step returns its logits too, and sampled rows (each with
    its own seeded generator) and entropy-spending rules draw from them outside the step; the
    batch stays static and every row decodes as the eager step does."""
    import dataclasses

    from fastdllm.engine.params import DecodeConfig

    static = LLM(llm.model, llm.tokenizer, llm.model_dir, llm.special, default_block_size=B,
                 runner=RunnerConfig(cpu_static="eager", widths=(1, 8, B)))
    eager = LLM(llm.model, llm.tokenizer, llm.model_dir, llm.special, default_block_size=B,
                runner=RunnerConfig(enforce_eager=True))
    prompts = [list(range(10, 10 + n)) for n in (3, 8, 13, 16, 21, 32, 37, 40)]
    base = DecodeConfig(block_size=B, sub_block_size=8, threshold=0.7, max_new_tokens=40)
    configs = [dataclasses.replace(base, temperature=0.8, top_p=0.9, seed=5),
               dataclasses.replace(base, rule="entropy_bounded", threshold=0.5)] + [base] * 6

    def run(which):
        engine = which.engine(8, 96)
        seqs = [engine.add(p, c, stop_token_ids=()) for p, c in zip(prompts, configs)]
        while engine.running:
            engine.step()
        return engine, [s.output_ids() for s in seqs]

    engine, got = run(static)
    _, want = run(eager)
    assert got == want
    # every step but the first (prefills wider than the widest static width) ran static
    assert engine.runner.static.steps_run >= engine.stats.steps - 2


@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")),
                    reason="torch.compile on the CPU (inductor) needs a C++ compiler")
def test_the_step_graphs_capture_is_compiled_and_equals_the_step(llm):
    """Issue 20, defect 4: CUDA graphs capture the step compiled by inductor
    (`StaticSteps.graph_step`). Capture needs a GPU; the compiled step itself runs anywhere: on
    the same input buffer and cache it gives the step's tokens, confidences and logits."""
    static = LLM(llm.model, llm.tokenizer, llm.model_dir, llm.special, default_block_size=B,
                 runner=RunnerConfig(cpu_static="eager", widths=(1, 8, B), max_batch=2))
    engine = static.engine(2, 64)
    steps = engine.runner.static
    assert steps.graph_step() is not StaticShape.step
    shape = steps.shape((8, 2, 64))
    with torch.inference_mode():  # as warm-up captures
        compiled = steps.graph_step()(shape)
        plain = shape.step()
    assert torch.equal(compiled[0], plain[0])
    torch.testing.assert_close(compiled[2], plain[2], atol=1e-5, rtol=1e-5)
    off = LLM(llm.model, llm.tokenizer, llm.model_dir, llm.special, default_block_size=B,
              runner=RunnerConfig(cpu_static="eager", compile_graphs=False))
    assert off.engine(1, 64).runner.static.graph_step() is StaticShape.step
