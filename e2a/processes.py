"""One e2a served by several processes: the parent's listening sockets, shared with children.

Why: a CPython process runs Python on one core at a time (the GIL), and on the ingest path
e2a's reactor thread is the bottleneck long before PostgreSQL is (docs/performance.md). With
``processes: N`` the twistd process (the parent) still does everything that must happen once:
data directory and secrets, embedded PostgreSQL, migrations, the shared-domain row, binding
the SMTP and HTTP ports. It then starts N-1 children (``python -m e2a.child``) that
inherit the two listening sockets and run the same service without those duties: SMTP
sessions, the HTTP API and WebSockets, the webhook, relay and retention workers. All processes
accept from the same kernel queues, so whichever is free takes the next connection.

Nothing that correctness depends on lives in one process (queues are claimed with ``FOR UPDATE
SKIP LOCKED``, cross-process events go through LISTEN/NOTIFY), so this is exactly "several e2a
servers on one database", started by one command on one pair of ports.

Parent ↔ child protocol:

* the child's stdin carries one length-prefixed pickle of :class:`ChildSpec` (the parent's
  resolved :class:`~e2a.config.Config` and database DSN: a child never re-reads a config file
  that may have changed since the parent started), then stays open; end of file means the
  parent is gone, and the child stops rather than keep serving as an orphan;
* the child logs text lines to stdout; the parent relays each into its own log;
* SIGTERM stops a child cleanly (421 to SMTP sessions, 1001 to WebSockets), like twistd;
* a child that exits while the parent is running is restarted, with a back-off while it keeps
  failing (e.g. the database is down).
"""

from __future__ import annotations

import os
import pickle
import re
import signal
import socket
import struct
import sys
from dataclasses import dataclass
from typing import Any, BinaryIO

from twisted.internet import defer, protocol
from twisted.logger import Logger

from e2a import affinity
from e2a.config import Config
from e2a.logsetup import relay_structured

log = Logger()

__all__ = ["ChildSpec", "ProcessPool", "adopt_listening_socket", "encode_spec", "read_spec"]

#: File descriptors the listening sockets get in a child (0-2 are stdio).
CHILD_FDS = {"http": 3, "smtp": 4}

#: The ``[namespace#level]`` tag of a child's text log line: the parent re-logs at that level,
#: so its own ``logging.level`` filter keeps the children's warnings and errors.
_LEVEL_TAG = re.compile(r"^\[[^\]#]*#(debug|info|warn|error|critical)\] ")
_RELAY_LEVELS = {"debug": "debug", "info": "info", "warn": "warn", "error": "error", "critical": "critical"}

_LENGTH = struct.Struct("!I")
_MAX_SPEC = 16 * 1024 * 1024


@dataclass(frozen=True)
class ChildSpec:
    """What a child needs that it must not work out for itself."""

    config: Config
    dsn: str
    index: int  # 2..N (the parent is process 1)
    count: int
    fds: dict[str, int]


def encode_spec(spec: ChildSpec) -> bytes:
    body = pickle.dumps(spec, protocol=pickle.HIGHEST_PROTOCOL)
    return _LENGTH.pack(len(body)) + body


def read_spec(stream: BinaryIO) -> ChildSpec:
    """Read the spec the parent wrote first on our stdin (blocking, before the reactor runs).

    The channel is a pipe the parent created for this child, so the pickle comes from the same
    code base that is reading it.
    """
    head = _read_exactly(stream, _LENGTH.size)
    (size,) = _LENGTH.unpack(head)
    if size > _MAX_SPEC:
        raise ValueError(f"child spec of {size} bytes is not plausible")
    spec = pickle.loads(_read_exactly(stream, size))
    if not isinstance(spec, ChildSpec):
        raise TypeError(f"expected a ChildSpec, got {type(spec).__name__}")
    return spec


def _read_exactly(stream: BinaryIO, n: int) -> bytes:
    chunks = bytearray()
    while len(chunks) < n:
        chunk = stream.read(n - len(chunks))
        if not chunk:
            raise EOFError("the parent closed the pipe before sending the child spec")
        chunks += chunk
    return bytes(chunks)


def adopt_listening_socket(reactor: Any, fd: int, factory: Any) -> Any:
    """Serve ``factory`` on an inherited listening socket; returns the IListeningPort.

    ``adoptStreamPort`` duplicates the descriptor, so the inherited one is closed here.
    """
    probe = socket.socket(fileno=os.dup(fd))  # the kernel knows the address family
    family = probe.family
    probe.close()
    port = reactor.adoptStreamPort(fd, family, factory)
    os.close(fd)
    return port


# ------------------------------------------------------------------------------ the parent


class _Child(protocol.ProcessProtocol):
    def __init__(self, pool: ProcessPool, index: int) -> None:
        self.pool = pool
        self.index = index
        self.pid: int | None = None
        self.ended: defer.Deferred[None] = defer.Deferred()
        self.started_at = pool.reactor.seconds()
        self._partial = {1: b"", 2: b""}
        self._last_level = "info"

    def connectionMade(self) -> None:  # noqa: N802 - Twisted API
        self.pid = self.transport.pid
        self.transport.write(encode_spec(self.pool.spec_for(self.index)))
        # stdin stays open: its end of file tells the child that the parent is gone

    def childDataReceived(self, fd: int, data: bytes) -> None:  # noqa: N802 - Twisted API
        buf = self._partial.get(fd, b"") + data
        *lines, self._partial[fd] = buf.split(b"\n")
        for line in lines:
            self._relay(fd, line)

    def _relay(self, fd: int, line: bytes) -> None:
        text = line.decode("utf-8", "replace").rstrip("\r")
        if text.startswith("- "):
            text = text[2:]  # the child logs without timestamps; ours is on the line
        if not text:
            return
        if fd == 1 and relay_structured(text, self.index):
            return  # a mail-flow event, re-emitted with its fields (e2a.logsetup)
        if fd == 2:
            level = "error"  # stderr: an interpreter crash, never routine
        else:
            tag = _LEVEL_TAG.match(text)
            if tag:
                level = _RELAY_LEVELS[tag.group(1)]
            elif text.startswith("["):
                level = "info"  # a legacy twisted.python.log event: ``[-] …``, no level tag
            else:
                level = self._last_level  # a continuation line (a traceback's): same level
        self._last_level = level
        getattr(log, level)("[process {index}] {line}", index=self.index, line=text)

    def processEnded(self, reason: Any) -> None:  # noqa: N802 - Twisted API
        for fd, rest in self._partial.items():
            if rest:
                self._relay(fd, rest)
        self.pool._ended(self, reason.value)
        self.ended.callback(None)


class ProcessPool:
    """The parent's N-1 children: started once the parent serves, stopped before it stops.

    Args:
        reactor: spawns and signals the children, times restarts.
        config: the parent's resolved configuration (sent to every child).
        dsn: the database every process uses (the parent's embedded server or ``database.url``).
        listening: parent descriptors of the sockets to share, by name (``http``, ``smtp``).
        python: the interpreter the children run on (the parent's).
    """

    def __init__(
        self,
        reactor: Any,
        config: Config,
        dsn: str,
        listening: dict[str, int],
        *,
        python: str = sys.executable,
        restart_delay: float = 1.0,
        max_restart_delay: float = 30.0,
    ) -> None:
        self.reactor = reactor
        self.config = config
        self.dsn = dsn
        self.listening = listening
        self.python = python
        self.restart_delay = restart_delay
        self.max_restart_delay = max_restart_delay
        self._children: dict[int, _Child] = {}
        self._delays: dict[int, float] = {}
        self._restarts: dict[int, Any] = {}
        self._stopping = False

    @property
    def count(self) -> int:
        return self.config.processes

    def spec_for(self, index: int) -> ChildSpec:
        return ChildSpec(
            config=self.config,
            dsn=self.dsn,
            index=index,
            count=self.count,
            fds={name: CHILD_FDS[name] for name in self.listening},
        )

    def pids(self) -> list[int]:
        return [c.pid for c in self._children.values() if c.pid is not None]

    def start(self, listening: dict[str, int] | None = None) -> None:
        """Spawn the children; ``listening``: the sockets to share, when only known at start
        (the composition root builds the pool before it binds the ports)."""
        if listening is not None:
            self.listening = listening
        for index in range(2, self.count + 1):
            self._spawn(index)

    def _spawn(self, index: int) -> None:
        self._restarts.pop(index, None)
        if self._stopping:
            return
        child = _Child(self, index)
        child_fds: dict[int, Any] = {0: "w", 1: "r", 2: "r"}
        for name, fd in self.listening.items():
            child_fds[CHILD_FDS[name]] = fd
        # A child picks its own CPU (cpu_affinity): it must not inherit ours.
        with affinity.unpinned():
            self.reactor.spawnProcess(
                child,
                self.python,
                [self.python, "-m", "e2a.child"],
                env=dict(os.environ),
                childFDs=child_fds,
            )
        self._children[index] = child
        log.info("e2a process {index} of {count} started (pid {pid})", index=index, count=self.count, pid=child.pid)

    def _ended(self, child: _Child, status: Any) -> None:
        if self._children.get(child.index) is child:
            del self._children[child.index]
        if self._stopping:
            return
        # Ran for a while: the next failure starts the back-off afresh; crashing at start-up
        # (database down, bad socket) doubles it, so a broken child cannot spin.
        ran = self.reactor.seconds() - child.started_at
        delay = self.restart_delay if ran >= 10 * self.restart_delay else self._delays.get(child.index, 0.0) * 2
        delay = min(max(delay, self.restart_delay), self.max_restart_delay)
        self._delays[child.index] = delay
        log.error(
            "e2a process {index} (pid {pid}) ended unexpectedly ({status}); restarting in {delay:.0f} s",
            index=child.index, pid=child.pid, status=status, delay=delay,
        )
        self._restarts[child.index] = self.reactor.callLater(delay, self._spawn, child.index)

    async def stop(self, grace: float) -> None:
        """SIGTERM every child, wait up to ``grace`` seconds for their clean stop, then SIGKILL."""
        self._stopping = True
        for call in self._restarts.values():
            if call.active():
                call.cancel()
        self._restarts.clear()
        children = list(self._children.values())
        for child in children:
            _signal(child, signal.SIGTERM)
        if not children:
            return
        waiting = defer.DeferredList([c.ended for c in children], consumeErrors=True)
        def kill_all() -> None:
            for c in children:
                _signal(c, signal.SIGKILL)

        killer = self.reactor.callLater(grace, kill_all)
        await waiting
        if killer.active():
            killer.cancel()


def _signal(child: _Child, sig: int) -> None:
    try:
        child.transport.signalProcess(sig)
    except Exception:  # already gone (ProcessExitedAlready) or never started
        pass


# ------------------------------------------------------------------------------ the child
