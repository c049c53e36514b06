"""systemd's notify protocol (``sd_notify(3)``) with the standard library: one datagram per message.

A unit with ``Type=notify`` waits for ``READY=1``; one with ``WatchdogSec=`` restarts the service when
``WATCHDOG=1`` does not arrive within that time. systemd passes the socket in ``$NOTIFY_SOCKET`` (a
path, or ``@name`` for the abstract namespace); without it (tests, a shell) every call does nothing.
A failed send is logged once and never raised: notifying must not break the service it reports on.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger(__name__)


class Notifier:
    """Sends ``KEY=VALUE`` lines to ``$NOTIFY_SOCKET``; ``enabled`` is False without one."""

    def __init__(self, address: str | None):
        if address and address.startswith("@"):
            address = "\0" + address[1:]  # abstract namespace
        self.address = address or None
        self._warned = False

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Notifier:
        env = os.environ if env is None else env
        return cls(env.get("NOTIFY_SOCKET") or None)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *lines: str) -> bool:
        """Send one datagram (the lines joined by newlines); True when it went out."""
        if self.address is None:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.settimeout(1.0)  # a datagram send never waits long; never let it hang the caller
                sock.sendto("\n".join(lines).encode("utf-8"), self.address)
        except OSError as exc:
            if not self._warned:
                self._warned = True
                log.warning("cannot notify systemd at %r: %s (further failures are not logged)",
                            self.address.replace("\0", "@"), exc)
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        return self.send("READY=1", *([f"STATUS={status}"] if status else []))

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def stopping(self) -> bool:
        return self.send("STOPPING=1")


def watchdog_seconds(env: Mapping[str, str] | None = None) -> float | None:
    """The unit's ``WatchdogSec=`` as systemd exports it (``$WATCHDOG_USEC``, for this pid), else None."""
    env = os.environ if env is None else env
    pid = env.get("WATCHDOG_PID")
    if pid and pid.strip() != str(os.getpid()):
        return None
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec / 1e6 if usec > 0 else None
