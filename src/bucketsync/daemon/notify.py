"""systemd's ``sd_notify`` protocol: one datagram per message to ``$NOTIFY_SOCKET``.

The protocol is a few lines (newline-separated ``KEY=VALUE`` pairs in one
``AF_UNIX``/``SOCK_DGRAM`` datagram), so it needs no dependency. An address that
starts with ``@`` is in the abstract namespace (its first byte becomes NUL).
Outside systemd (no ``NOTIFY_SOCKET``) every call is a no-op, and a send that
fails is logged, never raised: losing a status line must not take the agent down.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping

import structlog

log = structlog.get_logger("bucketsync.notify")


def _address(raw: str) -> str | bytes:
    if raw.startswith("@"):
        return b"\0" + raw[1:].encode()  # abstract namespace: no file on disk
    return raw


def watchdog_interval(env: Mapping[str, str]) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings: half of ``WATCHDOG_USEC``, as sd_watchdog_enabled(3)
    advises. None when the watchdog is off, or when ``WATCHDOG_PID`` names another process
    (the variables were inherited, not meant for us)."""
    usec = env.get("WATCHDOG_USEC", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    pid = env.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return None
    return int(usec) / 1e6 / 2


def one_line(text: str) -> str:
    """A STATUS= value must not contain a newline: it would end the field."""
    return " ".join(text.split())


class Notifier:
    """Sends sd_notify messages to the socket named in the environment it is given."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        raw = env.get("NOTIFY_SOCKET", "")
        self.address: str | bytes | None = _address(raw) if raw else None
        self.watchdog = watchdog_interval(env)
        self._sock: socket.socket | None = None

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, **fields: str | int) -> bool:
        """One datagram of ``KEY=VALUE`` lines; True if it was sent."""
        if self.address is None:
            return False
        msg = "\n".join(f"{k}={v}" for k, v in fields.items()).encode()
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)
            self._sock.sendto(msg, self.address)
            return True
        except OSError as exc:
            log.warning("sd_notify failed", error=str(exc), message=msg.decode(errors="replace"))
            return False

    def ready(self, status: str | None = None) -> bool:
        return self.send(READY=1, **({"STATUS": one_line(status)} if status else {}))

    def status(self, text: str) -> bool:
        return self.send(STATUS=one_line(text))

    def reloading(self) -> bool:
        # MONOTONIC_USEC lets systemd >= 253 (Type=notify-reload) match the reload; older ones ignore it.
        return self.send(RELOADING=1, MONOTONIC_USEC=time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000)

    def stopping(self) -> bool:
        return self.send(STOPPING=1)

    def ping(self) -> bool:
        return self.send(WATCHDOG=1)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
