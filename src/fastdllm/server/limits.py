"""Slow, careless and foreign clients at the connection level (issue 21, classes 8 and 12):

- `header_deadline_protocol`: uvicorn's h11 protocol with a deadline on a request's headers
  (uvicorn has none: a client sending one header byte a second held its connection for ever);
  the body has its own deadline in `Server.read_body`;
- `RepeatFilter`: the same log message at most once per window, with a count of those left out,
  so a flood of bad connections cannot grow the log without bound;
- `allowed_hosts`: the Host names a server answers by default (DNS rebinding).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import time

from uvicorn.protocols.http.h11_impl import H11Protocol

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")


def header_deadline_protocol(seconds: float) -> type:
    """An h11 protocol class that answers 408 and closes a connection whose request headers are
    not complete `seconds` after its first byte (or after it opened). An idle kept-alive
    connection is closed by uvicorn's own `timeout_keep_alive`."""
    body = json.dumps({"error": {"message": f"the request headers did not arrive within {seconds:g} s",
                                 "type": "timeout_error", "param": None, "code": "header_timeout"}})
    response = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body.encode()))

    class HeaderDeadline(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            before = self.cycle
            if self._header_timer is None and (before is None or before.response_complete):
                self._arm()  # the first bytes of the next request on a kept-alive connection
            super().data_received(data)
            if self.cycle is not before:  # its headers arrived: the request runs
                self._disarm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._header_timer = self.loop.call_later(seconds, self._expire)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _expire(self) -> None:
            self._header_timer = None
            if not self.transport.is_closing():
                self.transport.write(response)
                self.transport.close()

    return HeaderDeadline


class RepeatFilter(logging.Filter):
    """Lets a message (by its logger and unformatted text) through once per `window` seconds;
    the next one let through says how many were left out in between."""

    def __init__(self, window: float = 10.0, clock=time.monotonic):
        super().__init__()
        self.window, self.clock = window, clock
        self._seen: dict[tuple[str, str], list] = {}  # key -> [last time let through, left out]

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, str(record.msg))
        now = self.clock()
        seen = self._seen.get(key)
        if seen is not None and now - seen[0] < self.window:
            seen[1] += 1
            return False
        if seen is not None and seen[1]:
            record.msg = f"{record.msg} ({seen[1]} more like it in the last {now - seen[0]:.0f} s not logged)"
        if len(self._seen) > 1024:  # bounded: messages that vary (addresses) start over
            self._seen.clear()
        self._seen[key] = [now, 0]
        return True


# the loggers a flood of bad connections writes to: uvicorn's errors (invalid requests, the
# concurrency cap) and asyncio's (accept() failing at the file-descriptor limit)
FLOODED_LOGGERS = ("uvicorn.error", "asyncio", "fastdllm.server")


_FILTER = RepeatFilter()


def limit_repeated_logs() -> RepeatFilter:
    """Rate-limit the flooded loggers (once per process: servers in one process share it)."""
    for name in FLOODED_LOGGERS:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
    return _FILTER


def allowed_hosts(bind_host: str, given: tuple[str, ...] | None) -> tuple[str, ...]:
    """The Host names to answer: those given, else the loopback names when bound to a loopback
    address (a web page that rebinds its own name to 127.0.0.1 then still sends that name),
    else any ("*": bound to 0.0.0.0 or a public address, the operator chose to be reached)."""
    if given is not None:
        return tuple(given)
    try:
        loopback = bind_host == "localhost" or ipaddress.ip_address(bind_host).is_loopback
    except ValueError:
        loopback = False
    return LOOPBACK_HOSTS if loopback else ("*",)


def host_name(header: str) -> str:
    """The name of a Host header, without its port ("[::1]:8000" -> "::1")."""
    if header.startswith("["):
        return header[1:header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header
