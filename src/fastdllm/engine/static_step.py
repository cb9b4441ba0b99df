"""Static steps: the decode step at fixed shapes, so it can be captured as a CUDA graph (GPU) or
compiled by torch.compile (CPU, opt-in).

A shape is (width W, batch bucket n, key bucket K). A step fits when every row is greedy, its
widest row fits a captured width and its key length a key bucket. Rows are padded up to W and
the batch up to n: spare tokens and spare rows write their KV into the cache's null page
(never a sequence's), read it, and their outputs are not read back. Each row keeps its own
mask, so padding changes no real row's attention. Why exact batch sizes and not one big shape:
the GEMM shape is part of what decides the last bits of a logit; a bucket per batch size keeps
the number of distinct shapes small while every step of one shape computes alike.

Everything a step varies (token ids, positions, write indices, attention limits, page tables, which
rows suppress [MASK], which places' logits are drawn) is one long input buffer per shape, filled
by one copy; the graph reads it and writes greedy tokens and confidences of P places per row
(P = the width, or the sub-block width for a full-block shape: a step never draws more), and
`run` picks the planned ones.
"""

from __future__ import annotations

import contextlib
import itertools
import sys
import time
import types

import torch

from ..model.kv_cache import CacheAccess
from .block_manager import NULL_PAGE
from .attention import row_limits
from .params import RunnerConfig

# `runner` below is the engine's ModelRunner (runner.py imports this module, not the reverse);
# a row is one (Sequence, ForwardPlan) of the step


# CPU (compiled) static steps only: a step whose padding (spare rows, rows padded up to the
# step width) would add more than this many places, or this fraction of its real places, runs
# as the packed eager step instead. On the CPU a padded place costs as much compute as a real
# one; a mixed diffusion batch at batch 8 (3 rows of 32 and 5 of 8) would nearly double its work
# (docs/design.md, "Static steps"). CUDA graphs pad freely: there the launches are the cost.
PAD_SLACK_TOKENS = 16
PAD_SLACK_FRACTION = 0.25


# CPU (compiled) static steps freeze the weights into each compiled shape while the copies
# stay under this budget: measured on the shipped AR model (11 MiB of fp32 weights), a frozen
# shape costs about 24 MiB more memory than an unfrozen one, i.e. about 2 weight copies
# (docs/design.md, "Static steps").
FREEZE_COPIES = 2
FREEZE_BUDGET_BYTES = 2 * 2**30


def own_code(fn):
    """`fn` under a code object of its own. Dynamo keeps compiled code per code object, guarded
    by shapes, not by which model: a compiled step holds its model's weights as constants
    (freezing), so one engine's compiled steps must never be found by another's (a second model
    of the same shape in the process would run the first one's weights)."""
    code = fn.__code__.replace(co_name=f"{fn.__name__}_{next(_CODES)}")
    return types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)


_CODES = itertools.count(1)


def pads_too_much(widths: list[int], W: int, n: int) -> bool:
    """Whether rows of these widths, padded to n rows of W places, waste more than the slack."""
    real = sum(widths)
    return n * W - real > max(PAD_SLACK_TOKENS, PAD_SLACK_FRACTION * real)


def buckets(limit: int, first: int = 1) -> list[int]:
    """Powers of two from `first` below `limit`, then `limit` itself."""
    out, b = [], first
    while b < limit:
        out.append(b)
        b *= 2
    return out + [limit]


def spare_writes(width: int, page_size: int) -> list[int]:
    """Where a spare place of a step writes its KV: inside the null page."""
    return [NULL_PAGE * page_size + j % page_size for j in range(width)]


def smallest_at_least(options: list[int], x: int) -> int | None:
    return next((o for o in options if o >= x), None)


class StaticShape:
    """One (W, n, K) shape: its input buffer and the step function run on it (eagerly, compiled,
    or replayed from a CUDA graph)."""

    def __init__(self, runner, width: int, batch: int, key_len: int, picks: int):
        self.runner, self.width, self.batch, self.key_len = runner, width, batch, key_len
        self.picks = picks  # P: places per row whose logits are drawn
        places = batch * width
        self.pages = runner.pages_for(key_len)  # table width per row
        # ids pos writes limits tables suppress picks
        self.sizes = [places, places, places, places, batch * self.pages, batch, batch * picks]
        self.buffer = torch.zeros(sum(self.sizes), dtype=torch.long, device=runner.device)
        self.buffer.copy_(torch.tensor(self.idle_inputs(), dtype=torch.long))
        self.graph = None
        self.outputs: tuple[torch.Tensor, torch.Tensor] | None = None
        self.replays = 0  # graph replays (tests and the GPU checks count them)

    def idle_inputs(self) -> list[int]:
        """Every row a spare row: writes and reads only the null page."""
        W, n = self.width, self.batch
        return ([0] * (n * W) + list(range(W)) * n + spare_writes(W, self.runner.page_size) * n
                + [1] * (n * W) + [NULL_PAGE] * (n * self.pages) + [0] * n + [0] * (n * self.picks))

    def step(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Greedy tokens and confidences (n * P,) of each row's picked places, and their logits
        (n * P, V) with [MASK] suppressed, from the input buffer. Sampling and entropies are
        drawn from the logits outside the step (`StaticSteps.run`'s caller), so a sampled row
        or an entropy-spending rule does not take the batch off the static step."""
        r, W, n, K, P = self.runner, self.width, self.batch, self.key_len, self.picks
        ids, pos, writes, limits, tables, suppress, picks = self.buffer.split(self.sizes)
        mask = r.attention_mask(limits.view(n, W), K)  # (n, 1, W, K)
        access = CacheAccess(r.cache, tables.view(n, self.pages), writes.view(n, W), K)
        logits = r.model(ids.view(n, W), pos.view(n, W), mask, access,
                         logits_slice=picks.view(n, P), rope=r.rope).flatten(0, 1)  # (n*P, V)
        if r.mask_token_id is not None:
            hide = suppress[:, None].expand(n, P).reshape(-1).bool()  # per row -> per drawn place
            logits[:, r.mask_token_id].masked_fill_(hide, float("-inf"))
        conf, tokens = torch.softmax(logits.float(), dim=-1).max(dim=-1)
        return tokens, conf, logits

    def capture(self, pool) -> None:
        """Record `step` as a CUDA graph (after two warm-up runs on a side stream, as capture
        requires); the idle inputs make those runs touch only the null page. Called under
        the runner's device (StaticSteps.warm_up), so stream, pool and graph are that device's."""
        stream = torch.cuda.Stream(device=self.runner.device)
        stream.wait_stream(torch.cuda.current_stream())
        step = self.runner.static.graph_step()  # compiled by inductor unless that failed
        with torch.cuda.stream(stream):
            for _ in range(2):
                step(self)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        # the stream named: torch's default capture stream is made once per process, on whichever
        # device was current then (cuda:0 for a second engine on cuda:1)
        with torch.cuda.graph(self.graph, pool=pool, stream=stream):
            tokens, conf, logits = step(self)
            # every graph writes its logits into one buffer shared by all shapes: an output of
            # its own per shape would hold (batch x places x vocabulary) each, for good
            shared = self.runner.static.logits_buffer(logits.shape[0])
            shared.copy_(logits)
            self.outputs = (tokens, conf, shared)

    def release(self) -> None:
        """Drop the graph and its outputs now (their memory goes back to the pool)."""
        if self.graph is not None:
            # a capture that failed half-way may refuse its reset; dropping it frees it anyway
            with contextlib.suppress(RuntimeError):
                self.graph.reset()
        self.graph = self.outputs = None

    def __call__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.graph is not None:
            self.replays += 1
            if torch.cuda.current_device() != self.runner.device.index:
                with torch.cuda.device(self.runner.device):  # replay on the captured device
                    self.graph.replay()
            else:
                self.graph.replay()
            return self.outputs
        return self.runner.static.compiled(self)


class StaticSteps:
    def __init__(self, runner, mode: str, config: RunnerConfig, picks: int | None = None):
        """`picks`: the most places a step draws per row (the speculative engine's: a verify
        forward draws all of its places, a draft forward at most a block); None: the plain
        engine's rule below."""
        self.runner, self.mode, self.config = runner, mode, config
        top = min(config.max_batch or runner.max_slots, runner.max_slots)
        self.batches = buckets(top)
        self.widths = sorted(set(config.widths))
        if picks is not None:
            self.picks = {w: min(w, picks) for w in self.widths}
        else:
            # the widest (full-block) shape draws at most the next width's places, a full-block
            # forward drawing one sub-block, unless that next width is the AR step's 1; every
            # other shape draws all of its places
            sub = self.widths[-2] if len(self.widths) > 1 and self.widths[-2] > 1 else None
            self.picks = {w: sub if sub and w == self.widths[-1] else w for w in self.widths}
        self.key_lens = buckets(runner.max_len, first=min(64, runner.max_len))
        self.shapes: dict[tuple[int, int, int], StaticShape] = {}
        self.ready: set[tuple[int, int, int]] = set()  # captured/compiled (eager: every shape)
        self.pool = None
        self._compiled = None
        self._logits: torch.Tensor | None = None  # graphs' shared logits output (logits_buffer)
        self._graph_compiled = None  # graph_step's compiled step
        self._graph_compile_failed = False
        self.graph_bytes = 0  # device memory the captured graphs took (their pool), measured
        self.steps_run = 0  # steps that ran as static steps (the rest ran the packed eager step)

    @property
    def replays(self) -> int:
        return sum(shape.replays for shape in self.shapes.values())

    def close(self) -> None:
        """Free every graph, compiled step and input buffer now: a runner and its static steps
        refer to each other, so without this they would wait for the garbage collector."""
        for shape in self.shapes.values():
            shape.release()
        self.shapes.clear()
        self.ready.clear()
        self.pool = self._compiled = self._graph_compiled = self._logits = None
        self.runner = None

    @staticmethod
    def enabled(config: RunnerConfig, device: torch.device) -> bool:
        if config.enforce_eager:
            return False
        return device.type == "cuda" or config.cpu_static != "off"

    @classmethod
    def for_runner(cls, runner, picks: int | None = None) -> "StaticSteps":
        cfg = runner.config
        mode = "graph" if runner.device.type == "cuda" else cfg.cpu_static
        return cls(runner, mode, cfg, picks)

    # ------------------------------------------------------------------ choosing a shape
    def shape_for(self, rows: list[tuple]) -> tuple[int, int, int] | None:
        widths = [p.end - p.start for _, p in rows]
        W = smallest_at_least(self.widths, max(widths))
        n = smallest_at_least(self.batches, len(rows))
        K = smallest_at_least(self.key_lens, max(p.key_len for _, p in rows))
        if W is None or n is None or K is None:
            return None
        if max(len(p.logit_positions) for _, p in rows) > self.picks[W]:
            return None  # draws more places than this width's shapes do
        if self.mode == "compile" and pads_too_much(widths, W, n):
            return None  # the packed eager step is cheaper
        key = (W, n, K)
        return key if self.mode == "eager" or key in self.ready else None

    def fits(self, rows: list[tuple]) -> bool:
        return self.shape_for(rows) is not None

    def shape(self, key: tuple[int, int, int]) -> StaticShape:
        if key not in self.shapes:
            self.shapes[key] = StaticShape(self.runner, *key, picks=self.picks[key[0]])
        return self.shapes[key]

    # ------------------------------------------------------------------ running
    def run(self, rows: list[tuple], logits: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Greedy tokens and confidences (R,) of the rows' logit positions, in row order, and,
        when `logits` is asked for, their logits (R, V) (a copy of R x V values: only for steps
        that sample, spend entropies or rescale confidences)."""
        r = self.runner
        W, n, K = key = self.shape_for(rows)
        shape = self.shape(key)
        P = shape.picks
        ids, pos, writes, limits, read, suppress, picks, sel = [], [], [], [], [], [], [], []
        spare_w = spare_writes(W, r.page_size)
        for i, (seq, plan) in enumerate(rows):
            w, block = plan.end - plan.start, seq.block
            ids += seq.tokens[plan.start:plan.end] + [0] * (W - w)
            pos += list(range(plan.start, plan.end)) + list(range(w, W))
            writes += r.write_index(seq.pages, plan.start, plan.end) + spare_w[w:]
            lim = row_limits(plan.start, plan.end, block)
            limits += lim + [lim[-1]] * (W - w)
            read += r.table(seq.pages, plan.key_len, shape.pages)
            suppress.append(1 if seq.suppress_mask else 0)
            idx = [x - plan.start for x in plan.logit_positions]
            picks += idx + [idx[-1] if idx else 0] * (P - len(idx))
            sel += range(i * P, i * P + len(idx))
        spare = n - len(rows)
        ids += [0] * (spare * W)
        pos += list(range(W)) * spare
        writes += spare_w * spare
        limits += [1] * (spare * W)
        read += [NULL_PAGE] * (spare * shape.pages)
        suppress += [0] * spare
        picks += [0] * (spare * P)
        flat = torch.tensor(ids + pos + writes + limits + read + suppress + picks + sel, dtype=torch.long)
        flat = flat.to(r.device, non_blocking=True)
        shape.buffer.copy_(flat[: shape.buffer.numel()])
        r.mirror = None  # the step writes past the eager steps' contiguous copy
        self.steps_run += 1
        tokens, conf, all_logits = shape()
        sel = flat[shape.buffer.numel():]
        return tokens[sel], conf[sel], all_logits[sel] if logits else None

    def logits_buffer(self, rows: int) -> torch.Tensor:
        """The first `rows` rows of the logits buffer every captured graph writes to."""
        if self._logits is None:
            r = self.runner
            most = max(self.batches) * max(self.picks.values())
            self._logits = torch.empty(most, r.model.config.vocab_size, dtype=r.dtype, device=r.device)
        return self._logits[:rows]

    def compiled(self, shape: StaticShape) -> tuple[torch.Tensor, torch.Tensor]:
        if self.mode == "eager":
            return shape.step()
        if self._compiled is None:
            # cpp_wrapper: the compiled step calls its kernels from C++, not from Python; freezing:
            # see warm_up. Measured in docs/design.md, "Static steps".
            self._compiled = self._compile({"cpp_wrapper": True})
        return self._compiled(shape)

    def _compile(self, options: dict):
        """The step compiled by inductor, one entry per shape. The guard filter drops the
        per-call checks on the model's modules and weights (they never change under an engine)."""
        import torch._dynamo

        # the default recompile limit (8) would silently fall back to eager (the cache is per
        # code object: every engine's shapes count towards the accumulated limit too)
        shapes = len(self.widths) * len(self.batches) * len(self.key_lens)
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 4 * shapes)
        torch._dynamo.config.accumulated_recompile_limit = max(
            torch._dynamo.config.accumulated_recompile_limit, 4096)
        return torch.compile(own_code(StaticShape.step), dynamic=False, options={
            **options, "guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe})

    # ------------------------------------------------------------------ warm-up
    def warm_up(self, log=None) -> None:
        """Capture (GPU) or compile (CPU) every shape, cheapest first, until the time cap; shapes
        left over, and any shape whose capture runs out of memory, run eagerly. Prints one
        progress line."""
        if self.mode == "eager":
            return
        log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        # cheapest (W * n * K) first: short keys are what every sequence starts with and small
        # batches what every light load runs, so the time cap drops the rarely used large shapes;
        # they also capture fastest, so the cap keeps the most shapes
        keys = sorted(((W, n, K) for W in self.widths for n in self.batches for K in self.key_lens),
                      key=lambda k: (k[0] * k[1] * k[2], k[2], k[1], k[0]))
        start = time.perf_counter()
        # freezing: the weights become constants of the compiled steps, so inductor packs them
        # for its matrix products once. Each shape then holds its own packed copy, so a model
        # whose copies would pass FREEZE_BUDGET_BYTES compiles unfrozen. Freezing is read outside
        # torch.compile's `options` (passed there it has no effect), so it is patched around the
        # compiling, which happens here only.
        import torch._inductor.config as inductor_config

        weights = sum(p.numel() * p.element_size() for p in self.runner.model.parameters())
        freeze = self.mode == "compile" and FREEZE_COPIES * weights * len(keys) <= FREEZE_BUDGET_BYTES
        if self.mode == "compile" and not freeze:
            log(f"static steps: {len(keys)} shapes of a {weights / 2**20:.0f} MiB model would pass "
                f"{FREEZE_BUDGET_BYTES / 2**30:g} GiB of frozen weight copies; compiling without freezing")
        # on the GPU everything below runs on the runner's device: `--device cuda:1` must not
        # capture on cuda:0's stream and pool
        device = torch.cuda.device(self.runner.device) if self.mode == "graph" else contextlib.nullcontext()
        failed: list[tuple[int, int, int]] = []
        with device, torch.inference_mode(), inductor_config.patch(freezing=freeze):
            reserved = torch.cuda.memory_reserved() if self.mode == "graph" else 0
            if self.mode == "graph" and self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            for key in keys:
                if time.perf_counter() - start > self.config.warmup_seconds:
                    break
                shape = self.shape(key)
                try:
                    self._prepare(shape)
                except torch.cuda.OutOfMemoryError:
                    # this shape runs eagerly; shapes of other widths may still fit
                    shape.release()
                    del self.shapes[key]
                    failed.append(key)
                    if self.mode == "graph":
                        torch.cuda.empty_cache()
                    continue
                except Exception as e:  # e.g. no C++ compiler for inductor on this machine
                    shape.release()
                    del self.shapes[key]
                    print(file=sys.stderr, flush=True)
                    why = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                    if self.mode == "compile":
                        log(f"static steps: compiling failed ({why}); every step runs eagerly")
                        self.ready.clear()
                        return
                    log(f"static steps: capturing shape {key} failed ({why}); the shapes not yet "
                        "captured run eagerly")
                    break
                self.ready.add(key)
                print(f"\rstatic steps: {len(self.ready)}/{len(keys)} shapes ready "
                      f"({time.perf_counter() - start:.1f} s)", end="", file=sys.stderr, flush=True)
            if self.mode == "graph":
                self.graph_bytes = torch.cuda.memory_reserved() - reserved
        print(file=sys.stderr, flush=True)
        what = "captured as CUDA graphs" if self.mode == "graph" else "compiled"
        left = len(keys) - len(self.ready) - len(failed)
        memory = f", {self.graph_bytes / 2**20:.0f} MiB of graph memory" if self.mode == "graph" else ""
        log(f"static steps: {len(self.ready)} shapes {what} in {time.perf_counter() - start:.1f} s{memory}"
            + (f"; {len(failed)} out of memory, run eagerly: {failed[:4]}" if failed else "")
            + (f"; {left} left eager (time cap {self.config.warmup_seconds:g} s)" if left else ""))

    def graph_step(self):
        """What a CUDA graph captures: the step compiled by inductor (fused norms, RoPE, SiLU-mul:
        a handful of kernels per layer instead of ~46), or, with `compile_graphs` off or after
        compiling failed once, the step itself."""
        if not self.config.compile_graphs or self._graph_compile_failed:
            return StaticShape.step
        if self._graph_compiled is None:
            self._graph_compiled = self._compile({})
        return self._graph_compiled

    def _prepare(self, shape: StaticShape) -> None:
        """Capture (GPU) or compile (CPU) one shape. On the GPU, a step that inductor cannot
        compile is captured uncompiled (and so are the shapes after it), with one log line."""
        if self.mode == "graph":
            try:
                shape.capture(self.pool)
            except torch.cuda.OutOfMemoryError:
                raise
            except Exception as e:
                if not self.config.compile_graphs or self._graph_compile_failed:
                    raise
                self._graph_compile_failed = True
                shape.release()
                print(f"\nstatic steps: compiling the step for its graphs failed ({type(e).__name__}: "
                      f"{str(e).splitlines()[0][:200] if str(e) else ''}); capturing it uncompiled",
                      file=sys.stderr, flush=True)
                shape.capture(self.pool)
        else:
            self.compiled(shape)
