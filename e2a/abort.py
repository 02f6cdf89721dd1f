"""A one-shot "stop now" request whose outcome stays knowable (issue: a 451 after a COMMIT).

WHY not ``Deferred.cancel()``: cancelling a coroutine Deferred fires it at once with a
failure, while the coroutine may still be waiting on a database statement that txpostgres
cannot withdraw (its canceller raises ``_CancelInProgress``); the coroutine then goes on, sends
its next statements and can COMMIT after the caller has already answered "not stored". An
:class:`AbortSignal` instead asks the work to stop at its next safe point: steps that commit
nothing (verification, waiting for a slot) are cancelled outright; a statement in flight has
its backend query cancelled and the caller waits for PostgreSQL's answer. The work then either
raises :class:`Aborted` (rolled back, nothing stored) or returns normally (the commit won the
race), and the SMTP reply follows that real outcome (mail.md §1.7 item 4).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from twisted.internet import defer

from e2a.errors import TransientError

__all__ = ["AbortSignal", "Aborted"]

T = TypeVar("T")


class Aborted(TransientError):
    """The work stopped on an :class:`AbortSignal` before anything was committed."""

    def __init__(self, message: str = "aborted before commit (store_timeout)") -> None:
        super().__init__(message)


class AbortSignal:
    """Set once by the party that waits (the SMTP session's ``store_timeout``).

    ``handled`` is set by work that honours the signal: it then promises to finish promptly
    after :meth:`request` with its true outcome, so the waiter keeps waiting for it instead of
    giving up (see :meth:`e2a.smtp.server.SmtpSession._await`).
    """

    def __init__(self) -> None:
        self.requested = False
        self.handled = False
        # Set by work whose writes may commit: ``probe()`` answers, with one cheap read, the id
        # to reply with when they did commit (else None). The waiter calls it before answering
        # "not stored" on any failure, because the failure may not be the transaction's real
        # outcome: a cancel request slower than the grace, or PostgreSQL reporting "canceled"
        # for a statement whose COMMIT was already applied (mail.md §1.7 item 4).
        self.probe: Callable[[], Awaitable[str | None]] | None = None
        self._handlers: list[Callable[[], Any]] = []

    def request(self) -> None:
        """Ask the work to stop; runs every registered handler once."""
        if self.requested:
            return
        self.requested = True
        handlers, self._handlers = self._handlers, []
        for fn in handlers:
            fn()

    def on_request(self, fn: Callable[[], Any]) -> Callable[[], None]:
        """Run ``fn`` when (or, if already requested, as soon as) the signal is set.
        Returns a function that withdraws ``fn``."""
        if self.requested:
            fn()
            return lambda: None
        self._handlers.append(fn)

        def withdraw() -> None:
            if fn in self._handlers:
                self._handlers.remove(fn)

        return withdraw

    def check(self) -> None:
        """Raise :class:`Aborted` when the signal is set (call before starting a step)."""
        if self.requested:
            raise Aborted()

    async def guard(self, d: defer.Deferred[T]) -> T:
        """Await ``d``, cancelling it when the signal is set.

        Only for steps that commit nothing (verification, a semaphore, a timer): their
        cancellation is the whole abort.
        """
        withdraw = self.on_request(d.cancel)
        try:
            return await d
        except defer.CancelledError:
            if self.requested:
                raise Aborted() from None
            raise
        finally:
            withdraw()
