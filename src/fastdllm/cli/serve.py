"""`fastdllm serve`: the OpenAI-compatible HTTP server (see docs/serving.md).

Only argparse is imported here, so `fastdllm --help` works without the server extras; the
server itself (fastapi, uvicorn) is imported when the command runs.
"""

from __future__ import annotations

import argparse

from ..errors import FastDLLMError
from .args import add_decode_args, add_model_args, decode_overrides, load_llm


def add_parser(subparsers) -> None:
    s = subparsers.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching")
    add_model_args(s)
    g = s.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--max-batch", type=int, default=8,
                   help="sequences decoded together; more requests wait for a free place (default: "
                        "8); their KV lives in the shared --kv-cache-memory pool")
    g.add_argument("--request-timeout", type=float, default=600.0,
                   help="seconds a request may take from arrival to its last token; 0 = no limit "
                        "(default: 600)")
    g.add_argument("--served-model-name", default=None,
                   help="the model name clients send (default: the --model argument)")
    g.add_argument("--max-model-len", type=int, default=None,
                   help="positions per sequence, prompt + answer (default: the model's context)")
    g.add_argument("--max-body-bytes", type=int, default=4 << 20,
                   help="largest request body accepted, checked before parsing (default: 4 MiB)")
    g.add_argument("--max-prompt-chars", type=int, default=None,
                   help="longest prompt (or all messages together) in characters, checked before "
                        "tokenizing (default: 64 x max-model-len)")
    g.add_argument("--text-timeout", type=float, default=5.0,
                   help="seconds to render the chat template and tokenize one request (default: 5)")
    g.add_argument("--drain-timeout", type=float, default=30.0,
                   help="on SIGTERM, seconds in-flight requests may take to finish before they are "
                        "cut (default: 30)")
    g.add_argument("--max-block-size", type=int, default=None,
                   help="largest block_size a request may ask for (default: 64, or the model's "
                        "block size if larger): a step is as slow as its widest row")
    g.add_argument("--max-draft-length", type=int, default=None,
                   help="largest draft_length a speculative request may ask for (default: 16, "
                        "at most 32 for the merged form)")
    g.add_argument("--max-step-tokens", type=int, default=None,
                   help="most positions one request may put into each forward (its block; the "
                        "merged form's (draft_length + 1) x (draft_length + 2)); default: the "
                        "server's own decoding defaults', at least 64")
    g.add_argument("--allowed-origins", nargs="*", default=(),
                   help="browser origins allowed to call the server (CORS), e.g. "
                        "http://localhost:3000, or * for any; default: none (requests carrying an "
                        "Origin header get 403)")
    g.add_argument("--allowed-hosts", nargs="*", default=None,
                   help="Host header names the server answers (DNS rebinding), or * for any; "
                        "default: localhost, 127.0.0.1 and ::1 when bound to a loopback address, "
                        "any otherwise")
    g.add_argument("--header-timeout", type=float, default=10.0,
                   help="seconds a connection may take to send a request's headers (default: 10)")
    g.add_argument("--body-timeout", type=float, default=30.0,
                   help="seconds a request's body may take to arrive after its headers; past it "
                        "408 (default: 30)")
    g.add_argument("--keep-alive-timeout", type=float, default=5.0,
                   help="seconds an idle kept-alive connection stays open (default: 5)")
    g.add_argument("--limit-concurrency", type=int, default=None,
                   help="connections and requests at once; over it new ones get 503 (default: "
                        "the open-file limit less 64)")
    g.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    add_decode_args(s)
    s.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from ..server import ServerConfig, serve
    except ImportError as e:
        raise FastDLLMError(f"the server needs extra packages ({e.name} is missing); "
                            "install them with: pip install 'fastdllm[serve]'") from None
    llm = load_llm(args)
    config = ServerConfig(
        served_model_name=args.served_model_name or args.model,
        defaults=llm.decode_config(**decode_overrides(args)),
        max_batch=args.max_batch,
        request_timeout=args.request_timeout or None,
        max_model_len=args.max_model_len,
        max_body_bytes=args.max_body_bytes,
        max_prompt_chars=args.max_prompt_chars,
        text_timeout=args.text_timeout,
        drain_timeout=args.drain_timeout,
        max_block_size=args.max_block_size,
        max_draft_length=args.max_draft_length,
        max_step_tokens=args.max_step_tokens,
        allowed_origins=tuple(args.allowed_origins),
        allowed_hosts=None if args.allowed_hosts is None else tuple(args.allowed_hosts),
        header_timeout=args.header_timeout,
        body_timeout=args.body_timeout,
        keep_alive_timeout=args.keep_alive_timeout,
        limit_concurrency=args.limit_concurrency,
    )
    serve(llm, config, host=args.host, port=args.port, log_level=args.log_level)
    return 0
