"""Running the server: in the foreground (`fastdllm serve`) or on a background thread
(tests, benchmarks, notebooks), always through uvicorn."""

from __future__ import annotations

import socket
import threading
import time

import httpx
import uvicorn

from ..llm import LLM
from .app import create_app
from .service import ServerConfig


def serve(llm: LLM, config: ServerConfig, *, host: str = "127.0.0.1", port: int = 8000,
          log_level: str = "info") -> None:
    """Serve until interrupted (Ctrl-C)."""
    uvicorn.run(create_app(llm, config), host=host, port=port, log_level=log_level,
                timeout_graceful_shutdown=5)


class BackgroundServer:
    """`with BackgroundServer(llm, config) as srv:` serves on 127.0.0.1 at a free port
    (`srv.url`, `srv.base_url` for OpenAI clients) until the block ends."""

    def __init__(self, llm: LLM, config: ServerConfig, *, host: str = "127.0.0.1",
                 startup_timeout: float = 30.0):
        self.app = create_app(llm, config)
        # bind before starting, so the port is ours (no race for a "free" port number)
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind((host, 0))
        self.host, self.port = host, self._socket.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        self.base_url = f"{self.url}/v1"
        self._server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning",
                                                     timeout_graceful_shutdown=2))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._socket]},
                                        name="fastdllm-uvicorn", daemon=True)
        self._startup_timeout = startup_timeout

    def __enter__(self) -> "BackgroundServer":
        self._thread.start()
        deadline = time.monotonic() + self._startup_timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/health", timeout=1.0).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            if not self._thread.is_alive():
                break
            time.sleep(0.02)
        self.__exit__(None, None, None)
        raise RuntimeError(f"the server did not come up at {self.url}")

    def __exit__(self, *exc) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)
        self._socket.close()
