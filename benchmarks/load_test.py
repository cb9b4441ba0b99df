"""Load test of `fastdllm serve`: N concurrent streaming clients, diffusion vs AR, one run.

Starts the server as a subprocess on 127.0.0.1, warms it up, then for each decoding mode
runs `--clients` clients that each send `--requests` streamed completions one after another
(the mode is chosen per request with the `mode` field, so both modes hit the same server).
Reports requests/s, output tokens/s, p50/p99 latency and time to first token, output tokens
per forward (from the server's /health counters) and errors (which must be 0), and writes
`load_test.json` and `load_test.md` (with machine info) to `--out`.

    python benchmarks/load_test.py --model path/to/checkpoint          # 32 clients x 10 requests
    python benchmarks/load_test.py --clients 4 --requests 2            # tiny random model in /tmp

Without --model, a tiny random Qwen2 checkpoint (the test fixture) is built in /tmp: its
numbers measure the serving overhead, not a real model's speed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, write_results  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["Once upon a time there was a little girl named Lily.", "What is two plus two?",
           "Please write a short story about a big red ball.", "Hello! How can I help you today?",
           "She liked to play outside in the sun with her dog.", "The answer is"]


@dataclass
class RequestResult:
    latency: float = 0.0  # request sent -> last event
    ttft: float | None = None  # request sent -> first non-empty text
    tokens: int = 0
    error: str | None = None
    text: str = ""


@dataclass
class ModeResult:
    mode: str
    results: list[RequestResult] = field(default_factory=list)
    wall_s: float = 0.0
    forward_calls: int = 0
    timed_out: bool = False
    texts: dict = field(default_factory=dict)  # (client, request) -> output text

    def summary(self) -> dict:
        ok = [r for r in self.results if r.error is None]
        tokens = sum(r.tokens for r in ok)
        lat = sorted(r.latency for r in ok)
        ttft = sorted(r.ttft for r in ok if r.ttft is not None)
        errors = [r.error for r in self.results if r.error is not None]
        return {
            "mode": self.mode,
            "requests": len(self.results),
            "errors": len(errors),
            "error_examples": errors[:3],
            "timed_out": self.timed_out,
            "wall_s": round(self.wall_s, 3),
            "requests_per_s": round(len(ok) / self.wall_s, 3) if self.wall_s else 0.0,
            "output_tokens": tokens,
            "output_tokens_per_s": round(tokens / self.wall_s, 2) if self.wall_s else 0.0,
            "latency_p50_s": _percentile(lat, 50),
            "latency_p99_s": _percentile(lat, 99),
            "ttft_p50_s": _percentile(ttft, 50),
            "ttft_p99_s": _percentile(ttft, 99),
            "forward_calls": self.forward_calls,
            "tokens_per_forward": round(tokens / self.forward_calls, 3) if self.forward_calls else 0.0,
        }


def _percentile(xs: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks; xs sorted."""
    if not xs:
        return None
    pos = (len(xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return round(xs[lo] + (xs[hi] - xs[lo]) * (pos - lo), 4)


# ---------------------------------------------------------------------------------- clients
async def one_request(client: httpx.AsyncClient, body: dict) -> RequestResult:
    out = RequestResult()
    t0 = time.perf_counter()
    try:
        async with client.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                out.error = f"HTTP {r.status_code}: {(await r.aread()).decode()[:200]}"
                return out
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    out.error = event["error"]["message"]
                    break
                if event["choices"] and event["choices"][0]["text"]:
                    out.text += event["choices"][0]["text"]
                    if out.ttft is None:
                        out.ttft = time.perf_counter() - t0
                if event.get("usage"):
                    out.tokens = event["usage"]["completion_tokens"]
    except httpx.HTTPError as e:
        out.error = f"{type(e).__name__}: {e}"
    out.latency = time.perf_counter() - t0
    return out


async def run_mode(url: str, mode: str, args: argparse.Namespace, bad: "BadClient | None" = None
                   ) -> ModeResult:
    """`--clients` good streaming clients; with `bad`, a second client sends the bad-request
    corpus over and over for as long as the good clients run."""
    result = ModeResult(mode)
    limits = httpx.Limits(max_connections=args.clients, max_keepalive_connections=args.clients)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=args.time_limit) as client:
        async def client_loop(i: int) -> None:
            for j in range(args.requests):
                body = {"model": "load-test", "prompt": PROMPTS[(i + j) % len(PROMPTS)],
                        "max_tokens": args.max_tokens, "mode": mode, "stream": True,
                        "stream_options": {"include_usage": True}}
                r = await one_request(client, body)
                result.results.append(r)
                result.texts[(i, j)] = r.text

        await one_request(client, {"model": "load-test", "prompt": PROMPTS[0], "max_tokens": 8,
                                   "mode": mode, "stream": True})  # warm-up
        calls0 = (await client.get("/health")).json()["engine"]["forward_calls"]
        t0 = time.perf_counter()
        tasks = [asyncio.create_task(client_loop(i)) for i in range(args.clients)]
        bad_task = asyncio.create_task(bad.run(url, tasks)) if bad is not None else None
        done, pending = await asyncio.wait(tasks, timeout=args.time_limit)
        for t in pending:
            t.cancel()
        result.timed_out = bool(pending)
        result.wall_s = time.perf_counter() - t0
        if bad_task is not None:
            await bad_task
        try:
            result.forward_calls = (await client.get("/health", timeout=5)).json()["engine"]["forward_calls"] - calls0
        except (httpx.HTTPError, KeyError, ValueError):
            result.forward_calls = 0
    missing = args.clients * args.requests - len(result.results)
    result.results += [RequestResult(error="not finished within --time-limit")] * missing
    return result


class BadClient:
    """Sends every entry of the bad-request corpus (tests/data/bad_requests.jsonl) in order, again
    and again while the good clients run (at least one full pass), each with a `hang_s` timeout:
    no answer in time counts as a hang. `first_pass` tallies the distinct inputs."""

    def __init__(self, hang_s: float):
        sys.path.insert(0, str(REPO / "tests"))
        from fixtures import bad_requests

        self.corpus = bad_requests()
        self.hang_s = hang_s
        self.sent = 0
        self.first_pass: list[dict] = []

    async def run(self, url: str, good: list[asyncio.Task]) -> None:
        async with httpx.AsyncClient(base_url=url, timeout=self.hang_s) as client:
            while True:
                for case in self.corpus:
                    if self.sent >= len(self.corpus) and all(t.done() for t in good):
                        return
                    outcome = await self._send(client, case)
                    if self.sent < len(self.corpus):
                        self.first_pass.append({"id": case["id"], "expected": case["status"], **outcome})
                    self.sent += 1

    async def _send(self, client: httpx.AsyncClient, case: dict) -> dict:
        t0 = time.perf_counter()
        try:
            r = await client.post(f"/v1/{case['route']}", content=case["content"],
                                  headers={"content-type": "application/json"})
            status = r.status_code
            if status == 200 and r.headers.get("content-type", "").startswith("text/event-stream"):
                status = 200  # a streamed 200 (the body may still carry an error event)
        except httpx.TimeoutException:
            status = "hang"
        except httpx.HTTPError as e:
            status = f"{type(e).__name__}"
        return {"status": status, "seconds": round(time.perf_counter() - t0, 3)}

    def tally(self) -> dict:
        st = [c["status"] for c in self.first_pass]
        return {"inputs": len(st), "4xx": sum(isinstance(s, int) and 400 <= s < 500 for s in st),
                "5xx": sum(isinstance(s, int) and s >= 500 for s in st),
                "2xx": sum(isinstance(s, int) and s < 300 for s in st),
                "hangs": sum(s == "hang" for s in st),
                "other": sum(isinstance(s, str) and s != "hang" for s in st),
                "as_expected": sum(c["status"] == c["expected"] for c in self.first_pass),
                "total_sent": self.sent}


# ---------------------------------------------------------------------------------- server
def tiny_checkpoint() -> Path:
    sys.path.insert(0, str(REPO / "tests"))
    from fixtures import make_checkpoint  # the test suite's tiny random Qwen2

    path = Path(tempfile.gettempdir()) / "fastdllm-load-test" / "ckpt"
    if not (path / "config.json").is_file():
        make_checkpoint(path, "qwen2")
    return path


def start_server(args: argparse.Namespace, model: Path, log_path: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "fastdllm.cli", "serve", "--model", str(model), "--port", str(port),
           "--served-model-name", "load-test", "--max-batch", str(args.max_batch),
           "--device", args.device, "--log-level", "warning",
           "--request-timeout", str(args.time_limit)]
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited ({proc.returncode}); see {log_path}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.terminate()
    raise SystemExit(f"the server did not come up within 120 s; see {log_path}")


# ---------------------------------------------------------------------------------- report
COLUMNS = ["mode", "requests", "errors", "requests_per_s", "output_tokens_per_s", "tokens_per_forward",
           "latency_p50_s", "latency_p99_s", "ttft_p50_s", "ttft_p99_s"]


def notes(settings: dict) -> str:
    text = (f"{settings['clients']} concurrent streaming clients x {settings['requests']} requests "
            f"each, max_tokens {settings['max_tokens']}, server --max-batch {settings['max_batch']}, "
            f"greedy, model: {settings['model']}. tokens_per_forward = output tokens / model forward "
            "calls (one forward serves every batched row of one width). TTFT = time to the first "
            "non-empty text chunk.")
    if settings["tiny_model"]:
        text += (" The model is the test suite's tiny random checkpoint: the numbers measure the "
                 "server and scheduler overhead, not a real model's speed.")
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None, help="checkpoint dir (default: tiny random model)")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--requests", type=int, default=10, help="requests per client, sent one after another")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--max-batch", type=int, default=None, help="server --max-batch (default: --clients)")
    ap.add_argument("--modes", nargs="+", default=["diffusion", "ar"], choices=["diffusion", "ar"])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--time-limit", type=float, default=600.0, help="seconds per mode before giving up")
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "results")
    ap.add_argument("--fault", action="store_true",
                    help="fault mode: each mode runs without, then with, a second client sending the "
                         "bad-request corpus; writes load_test_fault.{json,md}")
    ap.add_argument("--hang-s", type=float, default=30.0,
                    help="fault mode: seconds without an answer that count as a hang (default: 30)")
    args = ap.parse_args(argv)
    if args.clients < 1 or args.requests < 1 or args.clients * args.requests > 10_000:
        ap.error("--clients and --requests must be >= 1, at most 10,000 requests in all")
    args.max_batch = args.max_batch or args.clients
    tiny = args.model is None
    model = tiny_checkpoint() if tiny else args.model

    args.out.mkdir(parents=True, exist_ok=True)
    log_path = Path(tempfile.gettempdir()) / "fastdllm-load-test-server.log"
    proc, url = start_server(args, model, log_path)
    try:
        if args.fault:
            return fault_mode(args, url, model, tiny)
        results = [asyncio.run(run_mode(url, mode, args)).summary() for mode in args.modes]
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()

    settings = {"model": "tiny random qwen2 (tests/fixtures.py)" if tiny else str(model),
                "tiny_model": tiny, "clients": args.clients, "requests": args.requests,
                "max_tokens": args.max_tokens, "max_batch": args.max_batch,
                "time_limit_s": args.time_limit}
    device = args.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    write_results(args.out / "load_test", "fastdllm serve: load test", machine_info(device),
                  [("Streaming completions, diffusion vs AR", results, COLUMNS)],
                  {"settings": settings, "results": results}, notes=notes(settings))
    print((args.out / "load_test.md").read_text())
    return 1 if any(r["errors"] for r in results) else 0


FAULT_COLUMNS = ["mode", "bad_client", "requests", "errors", "outputs_equal", "latency_p50_s",
                 "latency_p99_s", "ttft_p99_s", "requests_per_s"]
CORPUS_COLUMNS = ["mode", "inputs", "4xx", "5xx", "2xx", "hangs", "other", "as_expected", "total_sent"]


def fault_mode(args: argparse.Namespace, url: str, model: Path, tiny: bool) -> int:
    """Per mode: the good clients alone, then again beside the bad client; compare."""
    rows, corpus_rows, cases = [], [], {}
    for mode in args.modes:
        alone = asyncio.run(run_mode(url, mode, args))
        bad = BadClient(args.hang_s)
        beside = asyncio.run(run_mode(url, mode, args, bad))
        equal = sum(beside.texts.get(k) == v for k, v in alone.texts.items())
        for name, r in (("no", alone), ("yes", beside)):
            summary = r.summary()
            rows.append({**{k: summary[k] for k in FAULT_COLUMNS if k in summary}, "bad_client": name,
                         "outputs_equal": f"{equal}/{len(alone.texts)}" if name == "yes" else "-",
                         "error_examples": summary["error_examples"]})
        corpus_rows.append({"mode": mode, **bad.tally()})
        cases[mode] = bad.first_pass
    settings = {"model": "tiny random qwen2 (tests/fixtures.py)" if tiny else str(model),
                "tiny_model": tiny, "clients": args.clients, "requests": args.requests,
                "max_tokens": args.max_tokens, "max_batch": args.max_batch, "hang_s": args.hang_s,
                "time_limit_s": args.time_limit, "corpus": "tests/data/bad_requests.jsonl"}
    device = args.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    notes = (f"{args.clients} good streaming clients x {args.requests} greedy requests, first alone, "
             "then while a second client sends the bad-request corpus in a loop (at least one full "
             f"pass; an answer slower than {args.hang_s:g} s counts as a hang). outputs_equal: good "
             "outputs identical to the run without the bad client. The corpus table counts the "
             "first pass (each input once); as_expected = the status the corpus entry names.")
    write_results(args.out / "load_test_fault", "fastdllm serve: load test with a bad client",
                  machine_info(device),
                  [("Good requests, without and with the bad client", rows, FAULT_COLUMNS),
                   ("Bad-request corpus (first pass)", corpus_rows, CORPUS_COLUMNS)],
                  {"settings": settings, "results": rows, "corpus": corpus_rows, "cases": cases},
                  notes=notes)
    print((args.out / "load_test_fault.md").read_text())
    bad_errors = any(r["errors"] for r in rows)
    unequal = any(r["outputs_equal"] not in ("-",) and r["outputs_equal"].split("/")[0] !=
                  r["outputs_equal"].split("/")[1] for r in rows)
    return 1 if bad_errors or unequal else 0


if __name__ == "__main__":
    sys.exit(main())
