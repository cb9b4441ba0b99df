"""Running the server: in the foreground (`fastdllm serve`) or on a background thread
(tests, benchmarks, notebooks), always through uvicorn."""

from __future__ import annotations

import asyncio
import logging
import resource
import signal
import socket
import threading
import time

import httpx
import uvicorn

from ..llm import LLM
from .app import create_app, drain
from .limits import header_deadline_protocol, limit_repeated_logs
from .service import ServerConfig

log = logging.getLogger("fastdllm.server")


def serve(llm: LLM, config: ServerConfig, *, host: str = "127.0.0.1", port: int = 8000,
          log_level: str = "info") -> None:
    """Serve until SIGTERM or Ctrl-C, then drain (see `app.drain`); a second signal exits at once."""
    app = create_app(llm, config, host=host)
    _DrainingServer(uvicorn_config(app, config, host=host, port=port, log_level=log_level)).run()


def uvicorn_config(app, config: ServerConfig, **kw) -> uvicorn.Config:
    """uvicorn with the slow-client limits (limits.py): the h11 protocol with a header deadline,
    the keep-alive timeout, the connection cap, and repeated log messages rate-limited."""
    limit_repeated_logs()
    return uvicorn.Config(app, http=header_deadline_protocol(config.header_timeout),
                          timeout_keep_alive=config.keep_alive_timeout,
                          limit_concurrency=config.limit_concurrency or default_concurrency(),
                          timeout_graceful_shutdown=2, **kw)


def default_concurrency() -> int:
    """Connections + requests at once: the file-descriptor limit less 64 (the model's files, the
    log, the listening socket), so the server answers 503 before accept() starts failing."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(16, min(soft, 1 << 16) - 64)


class _DrainingServer(uvicorn.Server):
    """uvicorn, whose first SIGTERM / SIGINT drains the server before it exits."""

    def __init__(self, config: uvicorn.Config):
        super().__init__(config)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain: asyncio.Future | None = None

    async def startup(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets=sockets)

    def handle_exit(self, sig, frame) -> None:
        if self._drain is not None or self._loop is None:  # a second signal, or not started
            return super().handle_exit(sig, frame)
        server = self.config.app.state.server
        log.warning("shutting down: draining for up to %g s", server.config.drain_timeout)

        def start() -> None:
            self._drain = asyncio.ensure_future(drain(server, server.config.drain_timeout))
            self._drain.add_done_callback(lambda _: setattr(self, "should_exit", True))

        self._loop.call_soon_threadsafe(start)


class BackgroundServer:
    """`with BackgroundServer(llm, config) as srv:` serves on 127.0.0.1 at a free port
    (`srv.url`, `srv.base_url` for OpenAI clients) until the block ends."""

    def __init__(self, llm: LLM, config: ServerConfig, *, host: str = "127.0.0.1",
                 startup_timeout: float = 30.0):
        self.app = create_app(llm, config, host=host)
        # bind before starting, so the port is ours (no race for a "free" port number)
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind((host, 0))
        self.host, self.port = host, self._socket.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        self.base_url = f"{self.url}/v1"
        self._server = _DrainingServer(uvicorn_config(self.app, config, log_level="warning"))
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

    def drain(self) -> None:
        """What SIGTERM does to `fastdllm serve`: drain, then exit (returns at once)."""
        self._server.handle_exit(signal.SIGTERM, None)

    def __exit__(self, *exc) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)
        self._socket.close()
