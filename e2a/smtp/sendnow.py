"""An SMTP reply sent when it is written, not on the reactor's next turn.

Twisted's TCP transport never sends from ``write``: it queues the bytes, registers the socket
for writability (an ``epoll_ctl``), and the next reactor turn sends them and unregisters it (a
second ``epoll_ctl``). An SMTP client waits for each reply before its next command, so every
message costs four such round trips through the reactor (``MAIL``, ``RCPT``, ``DATA``, the
end of data) and eight ``epoll_ctl`` calls, each of which also lets go of the GIL, which the
mail-auth threads are usually waiting for. asyncio's transports try the ``send`` at once and
only wait for writability when the socket's buffer is full; :func:`write_now` does the same
for a plain TCP transport, and leaves every other case to ``transport.write``.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import tcp


def can_send_now(transport: Any) -> bool:
    """Whether bytes may go straight to the socket without overtaking or bypassing anything:
    a plain (not TLS) TCP connection, still open for writing and not aborted, with nothing
    queued.

    WHY the private attributes: ``dataBuffer``/``offset`` and ``_tempDataBuffer`` are the
    transport's queue (twisted.internet.abstract.FileDescriptor), ``_writeDisconnected`` and
    ``_aborting`` its half-close and abort (``abortConnection`` leaves ``connected`` set until
    ``connectionLost`` runs); a transport without them, or with anything queued, takes the
    queued path, so a Twisted that changes them only loses the shortcut.
    """
    if not isinstance(transport, tcp.Connection) or getattr(transport, "TLS", True):
        return False
    if not transport.connected or transport.disconnecting:
        return False
    if getattr(transport, "_writeDisconnected", True) or getattr(transport, "_aborting", True):
        return False  # half-closed, or aborted: Twisted's write never sends the bytes
    queued = getattr(transport, "_tempDataBuffer", None)
    buffer = getattr(transport, "dataBuffer", None)
    offset = getattr(transport, "offset", None)
    return queued == [] and isinstance(buffer, bytes) and offset == len(buffer)


def write_now(transport: Any, data: bytes) -> None:
    """``transport.write(data)``, sending what the socket takes at once when nothing is queued.

    Whatever the socket does not take (a full send buffer), and any error, goes through
    ``transport.write``: the reactor then sends the rest, or meets the error again in its own
    write and closes the connection the usual way (``connectionLost``), so no error is raised
    into the caller.
    """
    if data and can_send_now(transport):
        try:
            sent = transport.socket.send(data)
        except OSError:
            sent = 0
        data = data[sent:]
        if not data:
            return
    transport.write(data)
