"""The systemd notification protocol (``sd_notify``), by hand: no libsystemd, no new dependency.

systemd passes a Type=notify service the path of an ``AF_UNIX`` datagram socket in
``$NOTIFY_SOCKET`` (a leading ``@`` names an abstract socket). The service sends
newline-separated ``KEY=VALUE`` assignments: ``READY=1`` once it serves, ``STATUS=...``
for ``systemctl status``, ``WATCHDOG=1`` at least every ``$WATCHDOG_USEC`` / 2
microseconds when the unit has ``WatchdogSec=``, ``STOPPING=1`` when it shuts down.
Without ``$NOTIFY_SOCKET`` (agentd in the foreground) every call does nothing.
"""

from __future__ import annotations

import os
import socket


class Notifier:
    """Sends notifications to systemd (or nowhere, outside a Type=notify service)."""

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        path = env.get("NOTIFY_SOCKET") or ""
        if path.startswith("@"):
            path = "\0" + path[1:]
        self.address = path or None
        self._sock: socket.socket | None = None
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        mine = not pid or pid == str(os.getpid())
        self.watchdog_interval = int(usec) / 2e6 if usec.isdigit() and int(usec) > 0 and mine else None
        """Seconds between ``WATCHDOG=1`` pings (half the unit's WatchdogSec), None without a watchdog."""

    def send(self, **fields: str | int) -> bool:
        """Send ``KEY=VALUE`` lines (``notify.send(READY=1, STATUS="serving")``); True when sent."""
        if self.address is None:
            return False
        if self._sock is None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        message = "\n".join(f"{key}={value}" for key, value in fields.items()).encode()
        try:
            self._sock.sendto(message, self.address)
        except OSError:
            return False  # systemd went away (or never listened): never fatal to the service
        return True

    def ready(self, status: str) -> bool:
        return self.send(READY=1, STATUS=status, MAINPID=os.getpid())

    def status(self, status: str) -> bool:
        return self.send(STATUS=status)

    def watchdog(self) -> bool:
        return self.send(WATCHDOG=1)

    def stopping(self, status: str = "stopping") -> bool:
        return self.send(STOPPING=1, STATUS=status)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
