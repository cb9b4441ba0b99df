"""Text deltas -> server-sent events in OpenAI's framing (the deltas come from
`fastdllm.text_stream.TextStream`)."""

from __future__ import annotations

import json


def sse(payload: dict | str) -> str:
    """One server-sent event in OpenAI's framing: `data: <json>` and a blank line."""
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n"


SSE_DONE = sse("[DONE]")
