"""The batching loop: one thread owns the Engine and serves every request with it.

HTTP handlers (on the asyncio event loop) use three calls: `submit` a `Job` and read its
`events` queue, `cancel` it, read `health()`; they never touch the model. The scheduler thread
waits for work, then drives the engine with `Engine.stream()`, the driver every front end uses,
and between its steps:

    admit waiting jobs while the engine has room (each joins at its own prefill)
    drop cancelled jobs (client gone, timed out): `engine.abort` frees their slot
    for each step's Delta: decode its job's newly final tokens (`TextStream`), push the text;
                  a finished sequence or a matched stop string ends the job

so concurrent requests share forwards, and each gets exactly what it would alone (the engine
decides every row from its own logits). Events cross to the event loop with
`loop.call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
from dataclasses import asdict, dataclass
from typing import Callable

from ..engine.engine import Engine, Step
from ..engine.params import DecodeConfig
from ..engine.sequence import Sequence
from ..errors import FastDLLMError
from ..text_stream import TextStream
from .protocol import APIError

log = logging.getLogger("fastdllm.server")


@dataclass(frozen=True)
class Event:
    """What a job's handler receives: new text, and on the last event a finish reason (or an
    error). `completion_tokens` counts the final tokens so far."""

    text: str = ""
    completion_tokens: int = 0
    finish_reason: str | None = None  # "stop" | "length" on the last event
    error: APIError | None = None
    cached_tokens: int = 0  # prompt tokens served by the prefix cache (on the last event)
    # positions [start, end) of the sequence whose tokens this event reports (its final
    # tokens, cut at a stop string): what `logprobs` are read for
    span: tuple[int, int] = (0, 0)


class Job:
    """One request as the scheduler sees it. Created on the event loop by `submit`."""

    def __init__(self, prompt_ids: list[int], params: DecodeConfig, text: TextStream,
                 loop: asyncio.AbstractEventLoop):
        self.prompt_ids = prompt_ids
        self.params = params
        self.text = text
        self.loop = loop
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self.seq: Sequence | None = None
        self.reported = len(prompt_ids)  # positions before this were reported in events
        self.cancelled = False
        self.done = False  # the last event was pushed

    def push(self, event: Event) -> None:
        if event.finish_reason is not None or event.error is not None:
            self.done = True
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass


@dataclass
class SchedulerStats:
    admitted: int = 0
    finished: int = 0
    cancelled: int = 0
    failed: int = 0
    generated_tokens: int = 0  # final tokens of every request, finished or not


class Scheduler:
    def __init__(self, engine: Engine, detokenize: Callable[[list[int]], str]):
        self.engine = engine
        self.detokenize = detokenize
        self.stats = SchedulerStats()
        self._cond = threading.Condition()
        self._waiting: collections.deque[Job] = collections.deque()  # guarded by _cond
        self._running: dict[Sequence, Job] = {}  # only the scheduler thread changes it
        self._calls: list = []  # (work, future, loop) to run between steps; guarded by _cond
        self._stopping = False
        self.died: BaseException | None = None  # why the scheduler thread ended, if a bug
        self._thread = threading.Thread(target=self._loop, name="fastdllm-scheduler", daemon=True)

    # ------------------------------------------------------------------ event-loop side
    def start(self) -> None:
        self._thread.start()

    def shutdown(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join()

    def submit(self, prompt_ids: list[int], params: DecodeConfig, stop: tuple[str, ...]) -> Job:
        job = Job(prompt_ids, params, TextStream(self.detokenize, stop), asyncio.get_running_loop())
        with self._cond:
            if self.died is not None:
                raise APIError("the server's scheduler has stopped; restart the server",
                               status=503, type="server_error")
            if self._stopping:
                raise shutting_down()
            self._waiting.append(job)
            self._cond.notify()
        return job

    def cancel(self, job: Job) -> None:
        """Stop decoding `job` (its client left or its time ran out); its slot is freed before
        the next step. Safe to call at any time, also after the job ended."""
        with self._cond:
            job.cancelled = True
            if job in self._waiting:
                self._waiting.remove(job)
                self.stats.cancelled += 1
            self._cond.notify()

    @property
    def alive(self) -> bool:
        """False once the scheduler thread has died (a bug): /health then answers 503."""
        return self.died is None

    def health(self) -> dict:
        """Whether the thread is alive, requests decoding and waiting, request counts, and the
        engine's work so far."""
        return {"alive": self.alive, "active": len(self._running), "waiting": len(self._waiting),
                "waiting_for_pages": self.engine.waiting, "requests": asdict(self.stats),
                "engine": {"steps": self.engine.stats.steps,
                           "forward_calls": self.engine.stats.forward_calls},
                "kv_cache": self.engine.usage()}

    # ------------------------------------------------------------------ scheduler thread
    def _loop(self) -> None:
        reason = shutting_down()
        try:
            self._serve()
        except BaseException as e:  # a bug in the scheduler itself: say so, never hang
            self.died = e
            log.critical("the scheduler thread died; every request now fails", exc_info=True)
            reason = APIError(f"the server's scheduler stopped ({type(e).__name__}); restart the "
                              "server", status=503, type="server_error")
        with self._cond:
            self._stopping = True
            jobs = [*self._running.values(), *self._waiting]
            self._waiting.clear()
            calls, self._calls = self._calls, []
        for job in jobs:
            job.push(Event(error=reason))
        for _, future, loop in calls:
            try:
                loop.call_soon_threadsafe(_settle, future, None, reason)
            except RuntimeError:  # the event loop is closed
                pass

    def _serve(self) -> None:
        while self._admit(wait=True):
            try:
                for step in self.engine.stream():
                    self._emit(step)
                    if not self._admit(wait=False):
                        break
            except Exception:  # a bug outside any one sequence: fail the batch, keep serving
                log.exception("engine step failed; failing %d running requests", len(self._running))
                for seq, job in list(self._running.items()):
                    self.engine.abort(seq)
                    del self._running[seq]
                    self._fail(job, APIError("internal error while decoding", status=500,
                                             type="server_error"))

    def _admit(self, wait: bool) -> bool:
        """Between steps: take waiting jobs into the engine's free slots and drop cancelled
        ones; with `wait`, first sleep until there is work. False once shutting down."""
        with self._cond:
            while wait and not (self._stopping or self._waiting or self._running or self._calls):
                self._cond.wait()
            if self._stopping:
                return False
            admitted = [self._waiting.popleft()
                        for _ in range(min(self.engine.room, len(self._waiting)))]
        self._run_calls()
        self._drop_cancelled()
        for job in admitted:
            self._start(job)
        return True

    def _start(self, job: Job) -> None:
        if job.cancelled:  # cancelled between leaving the queue and now
            self.stats.cancelled += 1
            return
        try:
            job.seq = self.engine.add(job.prompt_ids, job.params)
        except FastDLLMError as e:  # the handler validated the request; this is a last guard
            self._fail(job, APIError.from_user_error(e))
            return
        except Exception as e:  # a bug that this request alone runs into
            log.exception("admitting a request failed")
            self._fail(job, _internal(e))
            return
        self.stats.admitted += 1
        self._running[job.seq] = job

    def _drop_cancelled(self) -> None:
        for seq, job in [(s, j) for s, j in self._running.items() if j.cancelled]:
            self.engine.abort(seq)
            del self._running[seq]
            self.stats.cancelled += 1

    def _emit(self, step: Step) -> None:
        for d in step:
            seq, job = d.seq, self._running[d.seq]
            try:
                if seq.error is not None:  # it failed alone inside the engine (a bug)
                    raise seq.error
                self._emit_one(d, job)
            except Exception as e:  # e.g. detokenizing this job's tokens: this job alone
                log.error("a request failed while decoding", exc_info=e)
                self.engine.abort(seq)
                self._running.pop(seq, None)
                self._fail(job, _internal(e))

    def _emit_one(self, d, job: Job) -> None:
        seq = d.seq
        text = job.text.feed(seq)
        end = seq.final_len
        if job.text.stopped or (job.text.hold and not seq.finished):
            # the tokens of the text sent: not those past a stop string, nor those held back
            end = max(job.reported, seq.prompt_len + job.text.tokens_shown(seq.final_ids()))
        span, job.reported = (job.reported, end), end
        n_final = end - seq.prompt_len
        self.stats.generated_tokens += span[1] - span[0]
        if d.finished or job.text.stopped:
            self.engine.abort(seq)  # a stop string ended it early; no-op if it finished
            del self._running[seq]
            self.stats.finished += 1
            reason = "stop" if job.text.stopped else seq.finish_reason
            job.push(Event(text, n_final, finish_reason=reason, span=span, cached_tokens=seq.cached))
        elif text or span[1] > span[0]:
            job.push(Event(text, n_final, span=span))

    # ------------------------------------------------------------------ work on the model
    def call(self, work: Callable[[], object]) -> "asyncio.Future":
        """`work()` on the scheduler thread between two steps (it may use the model: the
        thread owns it), e.g. scoring a prompt; the returned future gets its result."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self._cond:
            if self.died is not None or self._stopping:
                raise shutting_down()
            self._calls.append((work, future, loop))
            self._cond.notify()
        return future

    def _run_calls(self) -> None:
        with self._cond:
            calls, self._calls = self._calls, []
        for work, future, loop in calls:
            try:
                result, error = work(), None
            except Exception as e:  # the caller words it
                result, error = None, e
            loop.call_soon_threadsafe(_settle, future, result, error)

    def _fail(self, job: Job, error: APIError) -> None:
        self.stats.failed += 1
        job.push(Event(error=error))


def _settle(future: asyncio.Future, result, error: Exception | None) -> None:
    if future.done():  # its caller went away
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def shutting_down() -> APIError:
    return APIError("the server is shutting down and takes no new requests; retry on another "
                    "instance or after it restarts", status=503, type="server_error")


def _internal(e: BaseException) -> APIError:
    """A bug that one request ran into: a 500 for it alone (the others keep being served)."""
    return APIError(f"internal error while decoding this request ({type(e).__name__}); the "
                    "other requests are unaffected", status=500, type="server_error")
