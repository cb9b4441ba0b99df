"""The lean engine step (issue 10): one model forward and one device-to-host transfer per engine
step whatever the mix of phases; rows joining and leaving a mixed batch decode exactly as they
do alone (greedy and seeded sampling); the static step (the layout CUDA graphs capture, run
eagerly here) equals the eager step token for token for every plan kind; fused weights export
to the same bytes they were loaded from."""

from __future__ import annotations

import dataclasses
import shutil

import pytest
import torch
from safetensors import safe_open

from fastdllm import LLM
from fastdllm.engine.params import DecodeConfig, RunnerConfig
from fastdllm.model.checkpoint import save_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

B, S = 8, 4
KINDS = {"prefill", "full_block", "sub_block", "commit", "ar_step"}


def prompt(n: int, offset: int = 3) -> list[int]:
    return [(offset + 7 * i) % 300 + 3 for i in range(n)]


@pytest.fixture(scope="module")
def llm(checkpoint_factory) -> LLM:
    # peaked logits: several tokens per refinement step, so every plan kind shows up
    return LLM.load(checkpoint_factory("qwen2", lm_head_scale=12.0), device="cpu")


def with_runner(llm: LLM, runner: RunnerConfig) -> LLM:
    """The same model, tokenizer and block size, its steps run as `runner` says."""
    return LLM(llm.model, llm.tokenizer, llm.model_dir, llm.special, default_block_size=B, runner=runner)


def engine_of(llm: LLM, slots: int):
    """`llm`'s engine for prompts of up to 64 positions: compiled steps are shaped per key-length
    bucket, so a 64-position engine compiles one bucket (the model's context would take four)."""
    llm._engine = llm.new_engine(slots, 64, context=64)
    return llm._engine


def params(mode: str = "diffusion", **kw) -> DecodeConfig:
    base = dict(block_size=B, sub_block_size=S, threshold=0.6, max_new_tokens=21)
    if mode == "ar":
        base = dict(max_new_tokens=17)
    return DecodeConfig(mode=mode, **{**base, **kw})


def alone(llm: LLM, ids: list[int], p: DecodeConfig):
    return llm.generate_batch([ids], config=p)[0]


def run_schedule(engine, schedule: dict[int, list[tuple[list[int], DecodeConfig]]]):
    """Add sequences at the steps named by `schedule`, step until all finish; returns the
    sequences in order of addition and the kinds of plan seen in each step."""
    seqs, kinds_per_step, step = [], [], 0
    while engine.running or any(k >= step for k in schedule):
        for ids, p in schedule.get(step, []):
            seqs.append(engine.add(ids, p))
        kinds_per_step.append({s.plan().kind.value for s in engine.running})
        engine.step()
        step += 1
    return seqs, kinds_per_step


def mixed_schedule():
    dif, ar = params(), params("ar")
    return {
        0: [(prompt(3), dif), (prompt(8, 5), dif), (prompt(13, 7), ar)],
        2: [(prompt(16, 9), dif), (prompt(5, 11), params(sub_block_cache=False))],
        5: [(prompt(11, 13), params(max_new_tokens=6)), (prompt(9, 2), ar)],
        9: [(prompt(20, 4), params(threshold=1.0, max_new_tokens=9))],
    }


def test_mixed_batch_with_rows_joining_and_leaving_equals_each_row_alone(llm):
    engine = llm.engine(8, 64)
    calls0 = engine.stats.forward_calls
    steps0 = engine.stats.steps
    seqs, kinds = run_schedule(engine, mixed_schedule())
    # exactly one forward per step, and steps really mixed phases of different widths
    assert engine.stats.forward_calls - calls0 == engine.stats.steps - steps0
    assert max(len(k) for k in kinds) >= 3
    assert set().union(*kinds) == KINDS
    for seq in seqs:
        ref = alone(llm, seq.tokens[: seq.prompt_len], seq.params)
        assert seq.output_ids() == ref.token_ids, seq.params


def test_every_step_is_one_model_forward(llm):
    engine = llm.engine(8, 64)
    forwards = []
    handle = llm.model.register_forward_hook(lambda *_: forwards.append(1))
    try:
        steps = 0
        schedule = mixed_schedule()
        for k, v in schedule.items():
            for ids, p in v:
                engine.add(ids, p)
        while engine.running:
            before = len(forwards)
            engine.step()
            assert len(forwards) - before == 1
            steps += 1
    finally:
        handle.remove()
    assert steps > 5


def test_seeded_sampling_in_a_mixed_batch_equals_alone(llm):
    engine = llm.engine(8, 64)
    sampled = params(temperature=0.9, top_p=0.95, seed=7)
    schedule = {0: [(prompt(5), sampled), (prompt(8), params())],
                1: [(prompt(13), dataclasses.replace(sampled, seed=3)), (prompt(4), params("ar", seed=1,
                                                                                          temperature=0.7))]}
    seqs, _ = run_schedule(engine, schedule)
    for seq in seqs:
        assert seq.output_ids() == alone(llm, seq.tokens[: seq.prompt_len], seq.params).token_ids


# ---------------------------------------------------------------- static step (CUDA-graph layout)
@pytest.mark.parametrize("mode", ["diffusion", "ar"])
def test_static_step_equals_eager_token_for_token(llm, mode):
    """The padded, bucketed step that CUDA graphs capture, run eagerly on the CPU: batch buckets
    with spare rows, rows padded up to the step width, KV of spare places in the scratch slot."""
    static = with_runner(llm, RunnerConfig(cpu_static="eager", widths=(1, S, B)))
    eager = with_runner(llm, RunnerConfig(enforce_eager=True))
    prompts = [prompt(n, n) for n in (3, 8, 13, 16, 5)]  # shorter than, equal to, longer than B
    for kw in ({}, {"sub_block_cache": False}, {"threshold": 1.0}):
        p = params(mode, **kw) if mode == "diffusion" else params("ar")
        a = static.generate_batch(prompts, config=dataclasses.replace(p, trace=True))
        b = eager.generate_batch(prompts, config=dataclasses.replace(p, trace=True))
        for x, y in zip(a, b):
            assert x.token_ids == y.token_ids, kw
            assert [s["positions"] for s in x.trace] == [s["positions"] for s in y.trace], kw
        if mode == "ar":
            break
    used = static._engine.runner.static.shapes
    assert used and any(n > 1 for _, n, _ in used)  # batch buckets were used
    # prompts longer than the widest static width prefill eagerly; the rest went static
    widths = {w for w, _, _ in used}
    assert widths <= {1, S, B}


@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")),
                    reason="torch.compile on the CPU (inductor) needs a C++ compiler")
def test_compiled_cpu_step_equals_eager_token_for_token(llm, capsys):
    """cpu_static="compile": one AR shape (width 1, batch 1, one key bucket) compiled at engine
    start, then every AR step of the decode runs compiled and gives the eager tokens."""
    compiled = with_runner(llm, RunnerConfig(cpu_static="compile", widths=(1,), max_batch=1))
    p = params("ar", max_new_tokens=20)
    engine = engine_of(compiled, 1)
    assert "1 shapes compiled" in capsys.readouterr().err
    assert engine.runner.static.ready == {(1, 1, 64)}
    for ids in (prompt(3), prompt(13)):
        assert compiled.generate(ids, config=p).token_ids == llm.generate(ids, config=p).token_ids


@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")),
                    reason="torch.compile on the CPU (inductor) needs a C++ compiler")
def test_compiled_cpu_diffusion_equals_eager_token_for_token(llm, capsys):
    """cpu_static="compile" for diffusion: sub-block and full-block widths, batch buckets 1 and
    2, compiled (weights frozen into the compiled step) at engine start; mixed batches of
    prompts shorter than, equal to and longer than a block, both selection rules, decode the
    eager tokens and unmask the same positions."""
    compiled = with_runner(llm, RunnerConfig(cpu_static="compile", widths=(S, B), max_batch=2))
    engine = engine_of(compiled, 2)
    assert "4 shapes compiled" in capsys.readouterr().err
    assert engine.runner.static.ready == {(w, n, 64) for w in (S, B) for n in (1, 2)}
    static, ran = engine.runner.static, []
    run = static.run
    static.run = lambda rows, **kw: ran.append(static.shape_for(rows)) or run(rows, **kw)  # the compiled steps
    prompts = [prompt(n, n) for n in (3, 8, 13, 16)]
    for kw in ({}, {"rule": "threshold"}, {"threshold": 1.0}):
        p = params("diffusion", trace=True, **kw)
        for pair in (prompts[:2], prompts[2:], prompts[1:2]):
            ours, ref = compiled.generate_batch(pair, config=p), llm.generate_batch(pair, config=p)
            for x, y in zip(ours, ref):
                assert x.token_ids == y.token_ids, kw
                assert [t["positions"] for t in x.trace] == [t["positions"] for t in y.trace], kw
    assert compiled._engine is engine  # every decode above ran on the compiled engine
    # every width and batch bucket ran compiled, the full-block width drawing S of its B places
    assert len(ran) > 50 and set(ran) == engine.runner.static.ready
    assert static.picks == {S: S, B: S}


def test_compiled_cpu_steps_leave_wasteful_padding_to_the_packed_step():
    """On the CPU a padded place costs full compute: the diffusion mix of batch 8 (3 rows of 32,
    5 of 8) padded to 8 x 32 would nearly double its work, so it runs packed; uniform steps and
    AR batches padded up to their bucket stay static."""
    from fastdllm.engine.static_step import pads_too_much

    assert pads_too_much([32, 32, 32, 8, 8, 8, 8, 8], 32, 8)  # 136 real places, 256 padded
    assert pads_too_much([8] * 7 + [32], 32, 8)
    assert not pads_too_much([32] * 8, 32, 8)
    assert not pads_too_much([8] * 8, 8, 8)
    assert not pads_too_much([1] * 5, 1, 8)  # an AR batch of 5 in the bucket of 8
    assert pads_too_much([32, 8], 32, 2)  # 24 spare places for 40 real ones
    assert not pads_too_much([32, 24], 32, 2)  # 8 spare places


@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")),
                    reason="torch.compile on the CPU (inductor) needs a C++ compiler")
def test_compiled_cpu_step_without_freezing_past_the_budget(llm, monkeypatch, capsys):
    """Frozen weights are copied into every compiled shape: past the budget the steps compile
    unfrozen (one log line) and still give the eager tokens."""
    from fastdllm.engine import static_step

    monkeypatch.setattr(static_step, "FREEZE_BUDGET_BYTES", 0)
    compiled = with_runner(llm, RunnerConfig(cpu_static="compile", widths=(1,), max_batch=1))
    engine_of(compiled, 1)
    err = capsys.readouterr().err
    assert "frozen weight copies; compiling without freezing" in err and "1 shapes compiled" in err
    p = params("ar", max_new_tokens=12)
    assert compiled.generate(prompt(9), config=p).token_ids == llm.generate(prompt(9), config=p).token_ids


@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")),
                    reason="torch.compile on the CPU (inductor) needs a C++ compiler")
def test_two_compiled_models_in_one_process_keep_their_own_weights(llm, checkpoint_factory):
    """Compiled steps hold their model's weights as constants: a second model of the same
    shape, compiled in the same process at the same shapes, must not run the first one's."""
    other = LLM.load(checkpoint_factory("qwen2", lm_head_scale=12.0, seed=7), device="cpu")
    runner = RunnerConfig(cpu_static="compile", widths=(1,), max_batch=1)
    first, second = with_runner(llm, runner), with_runner(other, runner)
    engine_of(first, 1)
    engine_of(second, 1)
    p = params("ar", max_new_tokens=16)
    for ids in (prompt(5), prompt(11, 4)):
        a, b = llm.generate(ids, config=p).token_ids, other.generate(ids, config=p).token_ids
        assert first.generate(ids, config=p).token_ids == a
        assert second.generate(ids, config=p).token_ids == b
    assert a != b  # the two models do decode differently


def test_failed_cpu_compile_falls_back_to_eager(llm, monkeypatch, capsys):
    from fastdllm.engine import static_step

    def broken(self, shape):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(static_step.StaticSteps, "compiled", broken)
    compiled = with_runner(llm, RunnerConfig(cpu_static="compile", widths=(1,), max_batch=1))
    p = params("ar", max_new_tokens=12)
    engine = engine_of(compiled, 1)
    assert "compiling failed (RuntimeError: no C++ compiler); every step runs eagerly" in capsys.readouterr().err
    assert not engine.runner.static.ready
    assert compiled.generate(prompt(5), config=p).token_ids == llm.generate(prompt(5), config=p).token_ids


def test_static_step_with_rows_joining_and_leaving(llm):
    static = with_runner(llm, RunnerConfig(cpu_static="eager", widths=(1, S, B)))
    seqs, _ = run_schedule(static.engine(8, 64), mixed_schedule())
    for seq in seqs:
        assert seq.output_ids() == alone(llm, seq.tokens[: seq.prompt_len], seq.params).token_ids


# ---------------------------------------------------------------- one transfer per step
def steps_with_one_read_each(engine, count_syncs) -> int:
    """Step the engine to the end, asserting one host read per step; returns the steps."""
    steps = 0
    while engine.running:
        count_syncs.count = 0
        with count_syncs:
            engine.step()
        assert count_syncs.count == 1, f"step {steps}: {count_syncs.count} host reads"
        steps += 1
    return steps


@pytest.mark.parametrize("runner", [RunnerConfig(enforce_eager=True),
                                    RunnerConfig(cpu_static="eager", widths=(1, S, B))])
def test_each_step_reads_back_from_the_device_once(llm, count_syncs, runner):
    user = with_runner(llm, runner)
    engine = user.engine(10, 64)
    schedule = mixed_schedule()
    schedule[1] = [(prompt(6), params(temperature=0.8, seed=3))]
    for k in sorted(schedule):
        for ids, p in schedule[k]:
            engine.add(ids, p)
    steps = steps_with_one_read_each(engine, count_syncs)
    assert steps > 5


@pytest.mark.parametrize("runner", [RunnerConfig(enforce_eager=True),
                                    RunnerConfig(cpu_static="eager", widths=(1, S, B))])
def test_every_decoding_rule_keeps_one_read_per_step_and_decodes_as_alone(llm, count_syncs, runner):
    """Rows of the three parallel-decoding rules (selection.py) in one engine: the entropies the
    entropy-bounded rule spends come back in the step's one transfer, and a step holding such a
    row runs eagerly even where static steps are on, with the same output."""
    user = with_runner(llm, runner)
    engine = user.engine(6, 64)
    rows = [(prompt(3 + 4 * i, i), params(rule=rule, threshold=t))
            for i, (rule, t) in enumerate([("threshold", 0.6), ("left_anchored", 0.6), ("entropy_bounded", 0.6),
                                           ("entropy_bounded", 0.9), ("left_anchored", 0.9)])]
    rows.append((prompt(7, 9), params(rule="entropy_bounded", temperature=0.8, seed=5)))
    seqs = [engine.add(ids, p) for ids, p in rows]
    steps_with_one_read_each(engine, count_syncs)
    for seq, (ids, p) in zip(seqs, rows):
        solo = alone(llm, ids, p)
        assert seq.output_ids() == solo.token_ids, p.rule
        assert seq.stats.forward_calls == solo.stats["forward_calls"], p.rule


# ---------------------------------------------------------------- fused weights on disk
def tensors(path) -> dict[str, bytes]:
    out = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                t = f.get_tensor(name)
                out[name] = (str(t.dtype), tuple(t.shape), t.contiguous().view(torch.uint8).numpy().tobytes())
    return out


@pytest.mark.parametrize("fixture", ["qwen2_ckpt", "qwen2_tied_ckpt", "llama_ckpt", "qwen3_ckpt",
                                     "sharded_ckpt"])
def test_load_then_export_is_byte_identical(request, tmp_path, fixture):
    src = request.getfixturevalue(fixture)
    loaded = LLM.load(src, device="cpu", dtype="float32")
    assert any(".qkv_proj." in n for n, _ in loaded.model.named_parameters())  # fused in memory
    out = save_checkpoint(tmp_path / "export", loaded.model)
    want, got = tensors(src), tensors(out)
    assert got.keys() == want.keys()  # Hugging Face names on disk
    assert all(got[k] == want[k] for k in want)


def test_shipped_bf16_checkpoint_round_trips_through_fp32(tmp_path):
    from pathlib import Path

    src = Path(__file__).resolve().parents[1] / "models" / "fastdllm-wp-diffusion"
    if not (src / "model.safetensors").is_file():
        pytest.skip("shipped model not built")
    loaded = LLM.load(src, device="cpu", dtype="float32")
    out = save_checkpoint(tmp_path / "export", loaded.model, dtype=torch.bfloat16)
    assert tensors(out) == tensors(src)


def test_host_attention_rule_equals_the_tensor_rule():
    from fastdllm.engine.attention import attention_limits, row_limits

    for block in (1, 4, 8, 32):
        for start, end in ((0, 1), (5, 13), (31, 64), (100, 101)):
            positions = torch.arange(start, end)[None]
            assert row_limits(start, end, block) == attention_limits(positions, torch.tensor([[block]]))[0].tolist()
