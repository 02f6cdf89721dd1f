"""Inbound STARTTLS certificate reload: ``smtp.tls_cert``/``smtp.tls_key`` are re-read when
they change on disk, without a restart.

Why polling and not a signal: certificates are renewed by tools (certbot, acme.sh, a secrets
agent) that replace files; a stat of two files once a minute costs nothing, needs no hook in
those tools, and works the same in every process of ``processes: N`` (each watches for itself,
so no signal has to be forwarded to children). Sessions already open keep the context they
started with; every new session offers the new certificate.

A change that does not load (the key written but not yet the matching certificate, a broken
file) is logged once and the previous certificate stays in use; the next change is tried again.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from twisted.internet import task
from twisted.logger import Logger

__all__ = ["CHECK_INTERVAL", "CertificateWatcher"]

log = Logger()

#: Seconds between two looks at the files.
CHECK_INTERVAL = 60.0


def _stamp(paths: tuple[str, ...]) -> tuple[tuple[int, int, int], ...] | None:
    """(inode, size, mtime_ns) of each file; None when one cannot be read."""
    try:
        return tuple((st.st_ino, st.st_size, st.st_mtime_ns) for st in (os.stat(p) for p in paths))
    except OSError:
        return None


class CertificateWatcher:
    """Calls ``apply(load(cert, key))`` each time the pair changes on disk.

    Args:
        load: ``(cert_path, key_path) -> context factory`` (e2a.smtp.server.load_tls_options).
        apply: installs the new context factory (the SMTP factory's ``tls``).
        clock: an ``IReactorTime`` (a ``task.Clock`` in tests).
    """

    def __init__(
        self,
        cert_path: str,
        key_path: str,
        load: Callable[[str, str], Any],
        apply: Callable[[Any], None],
        clock: Any,
        interval: float = CHECK_INTERVAL,
    ) -> None:
        self.paths = (cert_path, key_path)
        self._load = load
        self._apply = apply
        self._clock = clock
        self.interval = interval
        self._seen = _stamp(self.paths)
        self._loop: task.LoopingCall | None = None
        self.reloads = 0

    def start(self) -> None:
        self._loop = task.LoopingCall(self.check)
        self._loop.clock = self._clock
        self._loop.start(self.interval, now=False)

    def stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None

    def check(self) -> bool:
        """Reload if the files changed since the last look; True when a new context was applied."""
        stamp = _stamp(self.paths)
        if stamp is None or stamp == self._seen:
            return False
        self._seen = stamp
        try:
            context = self._load(*self.paths)
            if hasattr(context, "getContext"):
                context.getContext()  # builds the SSL context: a key that does not match fails here
        except Exception as e:  # noqa: BLE001 - any load failure keeps the running certificate
            log.warn(
                "SMTP TLS certificate changed but does not load ({error}); still serving the previous one "
                "(smtp.tls_cert, smtp.tls_key)",
                error=str(e) or type(e).__name__,
            )
            return False
        self._apply(context)
        self.reloads += 1
        log.info("SMTP TLS certificate reloaded from {cert}", cert=self.paths[0])
        return True
