"""An OpenAI-compatible HTTP server with continuous batching (`fastdllm serve`).

    app.py         routes; streamed and non-streamed responses; error handlers
    service.py     ServerConfig; the served model and request preparation (all 4xx checks)
    protocol.py    request/response/error bodies (OpenAI's shapes)
    scheduler.py   the thread that owns the Engine and batches every request into its steps;
                   the routes use only submit, cancel and health
    stream.py      text deltas (from fastdllm.text_stream) -> server-sent events
    background.py  uvicorn in the foreground or on a background thread
"""

from .app import create_app
from .background import BackgroundServer, serve
from .service import ServerConfig

__all__ = ["BackgroundServer", "ServerConfig", "create_app", "serve"]
