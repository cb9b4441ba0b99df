"""Real client software against `fastdllm serve`, on each client's defaults: the openai SDK,
LangChain's `OpenAI` and `ChatOpenAI`, litellm (basics, then the fields it forwards:
presence_penalty, response_format text, logprobs) and lm-eval's `local-completions`
(log-likelihood and generate_until, tokenized_requests=True). Writes a table.

    python scripts/real_clients.py --model models/fastdllm-wp-diffusion \\
        --out docs/results/real_clients.md

LangChain and litellm are heavy and not test dependencies: they are installed into a throwaway
virtual environment (`--venv`, default a temporary directory) that also sees this
environment's packages (a .pth file), with pip from the package index; without network access
their rows say "not installed" and the rest still runs. The server runs in a subprocess on a
free port; nothing downloads weights.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import httpx

PACKAGES = ["langchain-openai", "litellm"]

# each check: (client, what, code run in the client venv; it prints one JSON line {"ok", "detail"})
CHECKS = [
    ("openai SDK", "completions + chat, logprobs, n, echo, models.retrieve", """
        from openai import OpenAI
        c = OpenAI(base_url=BASE, api_key="x", max_retries=0)
        a = c.completions.create(model=MODEL, prompt="Tom has 3 apples.", max_tokens=16, logprobs=2, n=2)
        b = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": Q}],
                                      max_completion_tokens=16, logprobs=True, top_logprobs=2)
        e = c.completions.create(model=MODEL, prompt="Tom has 3 apples.", max_tokens=0, echo=True, logprobs=1)
        assert c.models.retrieve(MODEL).id == MODEL
        done(f"{len(a.choices)} choices; chat {len(b.choices[0].logprobs.content)} token logprobs; "
             f"echo {len(e.choices[0].logprobs.tokens)} prompt tokens")
    """),
    ("LangChain OpenAI", "invoke, defaults", """
        from langchain_openai import OpenAI
        llm = OpenAI(model=MODEL, base_url=BASE, api_key="x", max_tokens=16)
        done(repr(llm.invoke("Tom has 3 apples.")[:40]))
    """),
    ("LangChain ChatOpenAI", "invoke + stream, defaults", """
        from langchain_openai import ChatOpenAI
        llm = ChatOpenAI(model=MODEL, base_url=BASE, api_key="x", max_tokens=16)
        text = llm.invoke(Q).content
        streamed = "".join(c.content for c in llm.stream(Q))
        done(f"{text[:30]!r}; streamed {len(streamed)} chars")
    """),
    ("litellm", "completion, defaults", """
        import litellm
        r = litellm.completion(model="openai/" + MODEL, api_base=BASE, api_key="x",
                               messages=[{"role": "user", "content": Q}], max_tokens=16)
        done(repr(r.choices[0].message.content[:40]))
    """),
    ("litellm", "presence_penalty, response_format text, logprobs", """
        import litellm
        r = litellm.completion(model="openai/" + MODEL, api_base=BASE, api_key="x",
                               messages=[{"role": "user", "content": Q}], max_tokens=16,
                               presence_penalty=0.5, response_format={"type": "text"},
                               logprobs=True, top_logprobs=2)
        done(f"{len(r.choices[0].logprobs['content'])} token logprobs")
    """),
    ("lm-eval local-completions", "loglikelihood + generate_until, tokenized_requests=True", """
        from lm_eval.api.instance import Instance
        from lm_eval.models.openai_completions import LocalCompletionsAPI
        api = LocalCompletionsAPI(model=MODEL, base_url=BASE + "/completions", tokenizer=MODEL_DIR,
                                  tokenizer_backend="huggingface", max_retries=1, max_gen_toks=32)
        ll = api.loglikelihood([Instance("loglikelihood", {}, ("Mia has 3 pens.", " She buys 4 more."), 0)],
                               disable_tqdm=True)
        gen = api.generate_until([Instance("generate_until", {}, ("Tom has 3 apples.", {"until": ["\\n\\n"]}), 0)],
                                 disable_tqdm=True)
        done(f"loglikelihood {ll[0][0]:.3f}; generated {gen[0][:30]!r}")
    """),
]

PRELUDE = """
import json, sys
BASE, MODEL, MODEL_DIR = sys.argv[1], sys.argv[2], sys.argv[3]
def done(detail):
    print(json.dumps({"ok": True, "detail": detail}))
Q = "Tom has 3 apples and buys 4 more. How many apples does he have?"
try:
"""
EPILOGUE = """
except ImportError as e:
    print(json.dumps({"ok": None, "detail": f"not installed ({e.name})"}))
except Exception as e:
    print(json.dumps({"ok": False, "detail": f"{type(e).__name__}: {str(e)[:300]}"}))
"""


def make_venv(path: Path) -> Path:
    python = path / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
        # see this environment's packages too (openai, lm-eval), also when it is itself a venv
        # (where --system-site-packages would show the base interpreter's instead)
        site = subprocess.run([str(python), "-c", "import site; print(site.getsitepackages()[0])"],
                              capture_output=True, text=True, check=True).stdout.strip()
        parents = [x for x in sys.path if x.endswith("site-packages")]
        Path(site, "parent_env.pth").write_text("\n".join(parents) + "\n")
    r = subprocess.run([str(python), "-m", "pip", "install", "-q", *PACKAGES], capture_output=True, text=True)
    if r.returncode:
        print(f"pip install {' '.join(PACKAGES)} failed (no network?); their rows will say so:\n"
              f"{r.stderr[-500:]}", file=sys.stderr)
    return python


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="models/fastdllm-wp-diffusion")
    ap.add_argument("--venv", default=None, help="the client environment (default: a temporary one)")
    ap.add_argument("--out", default=None, help="write the table (markdown) here; JSON beside it")
    args = ap.parse_args()
    tmp = tempfile.TemporaryDirectory() if args.venv is None else None
    python = make_venv(Path(args.venv or tmp.name) / "venv")
    port, name = free_port(), "fastdllm"
    server = subprocess.Popen([sys.executable, "-m", "fastdllm.cli", "serve", "--model", args.model,
                               "--served-model-name", name, "--port", str(port), "--device", "cpu",
                               "--max-new-tokens", "64", "--log-level", "warning"])
    base = f"http://127.0.0.1:{port}/v1"
    rows = []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        else:
            raise SystemExit("the server did not come up")
        for client, what, code in CHECKS:
            script = PRELUDE + textwrap.indent(textwrap.dedent(code), "    ") + EPILOGUE
            t0 = time.monotonic()
            r = subprocess.run([str(python), "-c", script, base, name, str(Path(args.model).resolve())],
                               capture_output=True, text=True, timeout=600)
            lines = [x for x in r.stdout.splitlines() if x.startswith("{")]
            result = json.loads(lines[-1]) if lines else {"ok": False, "detail": r.stderr[-300:]}
            rows.append({"client": client, "what": what, **result,
                         "seconds": round(time.monotonic() - t0, 1)})
            print(rows[-1], flush=True)
    finally:
        server.terminate()
        server.wait(timeout=60)
    mark = {True: "pass", False: "FAIL", None: "not installed"}
    table = ["| client | call | result | detail | s |", "|---|---|---|---|---|"]
    table += [f"| {r['client']} | {r['what']} | {mark[r['ok']]} | {r['detail'].replace('|', '/')} | {r['seconds']} |"
              for r in rows]
    header = (f"# Real clients against `fastdllm serve` ({args.model})\n\n"
              f"Regenerate: `python scripts/real_clients.py --model {args.model} --out {args.out}`\n\n")
    print("\n".join(table))
    if args.out:
        Path(args.out).write_text(header + "\n".join(table) + "\n")
        Path(args.out).with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
    return 0 if all(r["ok"] is not False for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
