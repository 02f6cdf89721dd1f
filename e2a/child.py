"""Entry point of one extra process of ``processes: N`` (``python -m e2a.child``).

The parent (e2a.processes.ProcessPool) spawns it with the listening sockets and writes one
:class:`~e2a.processes.ChildSpec` to its stdin; this module reads it and runs the same
composition root (e2a.service.build_service) with ``child=spec``. Kept apart from
e2a.processes so that the root imports the pool and nothing imports the root back.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

from twisted.internet import protocol
from twisted.logger import Logger

from e2a.processes import read_spec

log = Logger()


class _ParentWatch(protocol.Protocol):
    """Stops the child when its stdin (the parent's pipe) reaches end of file."""

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor

    def connectionLost(self, reason: Any = None) -> None:  # noqa: N802 - Twisted API
        if self.reactor.running:
            log.warn("the parent e2a process is gone; stopping")
            self.reactor.stop()


def child_main() -> int:
    """Entry point of a child process; a composition root like e2a.tap's makeService."""
    spec = read_spec(sys.stdin.buffer)
    from twisted.internet import reactor, stdio  # the process's reactor: this is an entry point
    from twisted.logger import globalLogBeginner

    from e2a.logsetup import child_log_observer
    from e2a.service import build_service

    # logging.level applies here; the format does not: the parent relays these lines into its own
    # log (text or JSON), adding the timestamp, so the pipe carries plain text (mail-flow events
    # as marked JSON lines, so the parent keeps their fields).
    observer = child_log_observer(spec.config, sys.stdout)
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)
    service = build_service(spec.config, reactor, child=spec)
    failed: list[bool] = []
    service.started.addErrback(lambda _f: failed.append(True))
    # mypy reads twisted.internet.stdio's Windows branch; the POSIX StandardIO takes stdin/stdout.
    stdio.StandardIO(  # type: ignore[call-arg]
        _ParentWatch(reactor), stdin=0, stdout=os.open(os.devnull, os.O_WRONLY), reactor=reactor
    )
    # Ctrl-C in a terminal reaches the whole process group: only the parent acts on it and
    # stops the children in order (SIGTERM), instead of children dying under it.
    reactor.callWhenRunning(signal.signal, signal.SIGINT, signal.SIG_IGN)
    reactor.callWhenRunning(service.startService)
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    reactor.run()
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(child_main())
