"""structlog set-up: JSON when not a TTY, console when it is; context from contextvars.

Records from the standard library's loggers (aiohttp's server, asyncio) go through
the same renderer, so a JSON log stays one JSON object per line. The access log is
aiohttp's, written through structlog at debug.
"""

from __future__ import annotations

import logging
import sys
from typing import Literal

import structlog
from aiohttp.abc import AbstractAccessLogger
from aiohttp.web_request import BaseRequest
from aiohttp.web_response import StreamResponse

_access = structlog.get_logger("bucketsync.access")


#: set by ``configure``: the agent logs at debug. Per-item and per-request lines are written
#: only then, never in an unconfigured process (a library user, a benchmark, a test), where
#: structlog's default would print a line for each of a million objects.
_debug = False


def debug_enabled() -> bool:
    """Whether per-item and per-request debug lines are wanted (hot paths ask once per run)."""
    return _debug


def configure(level: str = "info", fmt: Literal["auto", "json", "console"] = "auto") -> None:
    global _debug
    _debug = level == "debug"
    use_console = fmt == "console" or (fmt == "auto" and sys.stderr.isatty())
    renderer: structlog.typing.Processor = (
        structlog.dev.ConsoleRenderer() if use_console else structlog.processors.JSONRenderer()
    )
    exc_info: structlog.typing.Processor = (
        structlog.processors.format_exc_info if not use_console else structlog.dev.set_exc_info
    )
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
        exc_info,
    ]
    structlog.configure(
        processors=[*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    # Other libraries' chatter stays at warning unless we are debugging.
    root.setLevel(max(logging.WARNING, getattr(logging, level.upper())) if level != "debug" else logging.DEBUG)


class AccessLog(AbstractAccessLogger):
    """aiohttp's access log as structlog lines at debug: method, path, status, bytes, seconds.

    The path only, never the query or headers (a token could ride in either)."""

    def __init__(self, logger: logging.Logger, log_format: str) -> None:
        super().__init__(logger, log_format)
        self._on = debug_enabled()  # the level is set once per process

    @property
    def enabled(self) -> bool:
        return self._on

    def log(self, request: BaseRequest, response: StreamResponse, time: float) -> None:
        _access.debug(
            "request",
            method=request.method,
            path=request.path,
            status=response.status,
            bytes=response.body_length,
            seconds=round(time, 4),
            remote=request.remote,
        )
