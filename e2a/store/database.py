"""The one way e2a talks to PostgreSQL: named, retryable transactions over txpostgres.

Design (Synapse's ``runInteraction``, Buildbot's connector):

* ``run(desc, txn_fn, *args)`` checks a connection out of a small pool, runs ``txn_fn(txn, ...)``
  inside BEGIN/COMMIT, and retries the whole function on serialization failures and deadlocks.
  Transaction functions must therefore be safe to re-run and free of outside side effects.
* Side effects that must only happen once the data is durable (NOTIFY payloads are sent by
  PostgreSQL at commit anyway, but in-process pushes are not) go through ``txn.call_after``.
* A connection that broke (server restart, network) is replaced on the next checkout, so a
  database outage turns into :class:`~e2a.errors.TransientError` for the duration of the
  outage, not forever.
* A caller that stops waiting (a timeout, a client gone) gets ``CancelledError`` at once, also
  from a server that no longer answers; the work it abandoned has its statement cancelled
  (:class:`CancelRequests`) and keeps its connection until PostgreSQL answered.
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import psycopg2
import psycopg2.errorcodes
import psycopg2.extensions
from txpostgres import txpostgres

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionLost
from twisted.logger import Logger
from twisted.python.failure import Failure

from e2a.abort import Aborted, AbortSignal
from e2a.errors import TransientError

log = Logger()

T = TypeVar("T")

RETRYABLE = {
    psycopg2.errorcodes.SERIALIZATION_FAILURE,  # 40001
    psycopg2.errorcodes.DEADLOCK_DETECTED,  # 40P01
}
MAX_ATTEMPTS = 5
#: Cancel requests in flight at once (each one a connection); more wait their turn, never
#: dropped: an accept that was aborted must learn its statement's real outcome. A server that
#: stopped answering holds each one until it answers again.
MAX_CANCELS_IN_FLIGHT = 4


class PgConnection(txpostgres.Connection):
    """txpostgres's connection, quiet when the server closes it while it is idle.

    An idle connection is watched for NOTIFYs, so a server that goes away (a restart, a
    crash) makes psycopg2 raise in the reactor's read callback, which Twisted logs as an
    "Unhandled Error" traceback: one per pooled connection at every outage. Here the read
    ends the connection as lost instead; the pool replaces it at its next checkout, and the
    outage itself is reported by whoever needs the database next.
    """

    def doRead(self) -> Any:  # noqa: N802 - Twisted API
        try:
            return super().doRead()
        except psycopg2.OperationalError as e:
            log.debug("database connection closed while idle: {error}", error=str(e).strip())
            return ConnectionLost(str(e).strip())


class DatabaseUnavailable(TransientError):
    """The database could not be reached or the connection broke mid-transaction."""


_PARAM = re.compile(r"%%|%\((\w+)\)s")


def octets_sql(name: str) -> str:
    """The SQL value of a ``bytea`` column of mail octets, taken from whichever of the two
    parameters :func:`octets_params` gives for ``name`` is set: ``%(name_text)s`` or ``%(name)s``."""
    return f"COALESCE(convert_to(%({name}_text)s, 'UTF8'), %({name})s)"


#: The delimiter of the dollar-quoted literal that carries 7-bit mail octets (:func:`octets_params`).
OCTETS_TAG = b"$e2a_octets$"


class DollarQuoted:
    """A string constant psycopg2 puts into a statement as it stands: ``$e2a_octets$…$e2a_octets$``.

    WHY: psycopg2's own quoting of a ``str`` walks it character by character
    (``PQescapeStringConn``); for a 100 KB message that was a sixth of the reactor's time per
    message (docs/performance.md). In a dollar-quoted constant PostgreSQL takes every character
    up to the closing tag as it is (no escapes, whatever ``standard_conforming_strings`` says),
    so octets need no quoting at all when they are 7-bit, hold no NUL, and the first
    :data:`OCTETS_TAG` after the opening one is the closing one: the tag may not occur in the
    octets, nor start in them and end in the closing tag (octets ending in ``$e2a_octets``).
    Anything else raises ``ValueError``; :func:`octets_params` then sends ``bytea``.
    """

    __slots__ = ("_quoted",)

    def __init__(self, octets: bytes) -> None:
        if not octets.isascii() or b"\0" in octets:
            raise ValueError("only 7-bit octets without NUL can be dollar-quoted")
        quoted = OCTETS_TAG + octets + OCTETS_TAG
        # memchr for '$' first: most mail has none, and then only the closing tag can end it.
        if b"$" in octets and quoted.find(OCTETS_TAG, len(OCTETS_TAG)) != len(OCTETS_TAG) + len(octets):
            raise ValueError("octets that hold the dollar-quote's tag cannot be dollar-quoted")
        self._quoted = quoted

    def __conform__(self, protocol: Any) -> DollarQuoted:
        return self  # psycopg2's adapter protocol (ISQLQuote): this object quotes itself

    def getquoted(self) -> bytes:
        return self._quoted

    def __eq__(self, other: object) -> bool:
        return isinstance(other, DollarQuoted) and other._quoted == self._quoted

    def __hash__(self) -> int:
        return hash(self._quoted)

    def __repr__(self) -> str:
        return f"DollarQuoted({len(self._quoted) - 2 * len(OCTETS_TAG)} octets)"


def octets_params(name: str, value: bytes | None) -> dict[str, Any]:
    """The two parameters that carry mail octets (a stored message, a composed one) into a
    statement, for :func:`octets_sql`; exactly one is not None unless ``value`` is None.

    WHY: psycopg2 sends a ``bytes`` parameter as a hex literal in the statement's text, twice
    its size, which PostgreSQL's lexer then reads one character at a time and decodes; for a
    100 KB message that was over a third of PostgreSQL's CPU per message (docs/performance.md).
    Octets that are all 7-bit and none NUL, which most mail is, go as a string constant of
    their own size instead (``name_text``, a :class:`DollarQuoted` that needs no escaping),
    and ``convert_to(…, 'UTF8')`` gives the same octets back as ``bytea``: ASCII is the same
    octets in every server encoding PostgreSQL offers, and the pool's connections speak UTF8
    (:meth:`Database._connect`). Anything else (8-bit octets, NUL, content that holds the
    dollar-quote's tag) goes as ``bytea`` as before (``name``).
    """
    if value is not None:
        try:
            return {f"{name}_text": DollarQuoted(value), name: None}
        except ValueError:
            pass
    return {f"{name}_text": None, name: value}


class Prepared:
    """A statement PostgreSQL parses and plans once per connection (``PREPARE``/``EXECUTE``).

    Written like any other statement here (psycopg2 ``%(name)s`` parameters). On the hot
    ingest path the planning of the same few statements was a large share of PostgreSQL's CPU
    per message; a prepared statement is planned once per pooled connection. Only statements
    run outside an explicit transaction (:meth:`Database.fetchall_prepared`, the reads and
    writes of :meth:`Database.run_batched`) use the prepared form, and the ``PREPARE`` is always
    its own statement, so a rolled-back transaction can never leave a statement half known.
    Inside :meth:`Database.run` the plain SQL runs (same result).

    Every pooled connection runs with ``plan_cache_mode = force_generic_plan``
    (:meth:`Database._connect`): left to choose, PostgreSQL re-plans a statement at every
    ``EXECUTE`` whenever its generic plan looks dearer than the custom ones, which for the
    accept's read cost more than running it (0.5 ms of planning per message). A prepared
    statement must therefore be written so that its plan does not depend on the parameters'
    values or on the table's statistics: each lookup served by one index
    (``tests/storage/test_lookup_plans.py``).
    """

    def __init__(self, name: str, sql: str) -> None:
        order: list[str] = []

        def dollar(match: re.Match[str]) -> str:
            if match.group(0) == "%%":
                return "%"
            key = match.group(1)
            if key not in order:
                order.append(key)
            return f"${order.index(key) + 1}"

        self.name = name
        self.sql = sql
        self.prepare_sql = f"PREPARE {name} AS {_PARAM.sub(dollar, sql)}"
        self.execute_sql = f"EXECUTE {name}(" + ", ".join(f"%({k})s" for k in order) + ")"


#: Names prepared on each pooled connection (a replaced connection starts empty).
_PREPARED: weakref.WeakKeyDictionary[Any, set[str]] = weakref.WeakKeyDictionary()


async def _prepared_sql(cursor: txpostgres.Cursor, statement: Prepared) -> str:
    """The ``EXECUTE`` text for ``statement``, preparing it first on this connection if needed.

    Must only be called outside an explicit transaction (autocommit).
    """
    names = _PREPARED.setdefault(cursor._connection, set())
    if statement.name not in names:
        await cursor.execute(statement.prepare_sql)
        names.add(statement.name)
    return statement.execute_sql


class Txn:
    """A cursor wrapper handed to transaction functions.

    ``execute`` returns nothing; ``fetchall``/``fetchone`` return dict rows so that callers
    never index columns by position.
    """

    def __init__(self, cursor: txpostgres.Cursor) -> None:
        self._cursor = cursor
        self.after_commit: list[Callable[[], Any]] = []
        #: The keys the transaction's :meth:`report` statements returned; complete once it
        #: committed (a batched transaction learns them only then).
        self.reported: set[str] = set()

    async def execute(self, sql: str, params: Sequence[Any] | dict[str, Any] | None = None) -> None:
        await self._cursor.execute(sql, params)

    async def fetchall(self, sql: str, params: Sequence[Any] | dict[str, Any] | None = None) -> list[dict[str, Any]]:
        await self._cursor.execute(sql, params)
        if self._cursor.description is None:
            return []
        names = [c.name for c in self._cursor.description]
        return [dict(zip(names, row, strict=True)) for row in self._cursor.fetchall()]

    async def fetchone(self, sql: str, params: Sequence[Any] | dict[str, Any] | None = None) -> dict[str, Any] | None:
        rows = await self.fetchall(sql, params)
        return rows[0] if rows else None

    async def fetchval(self, sql: str, params: Sequence[Any] | dict[str, Any] | None = None) -> Any:
        row = await self.fetchone(sql, params)
        return None if row is None else next(iter(row.values()))

    async def fetchall_prepared(self, statement: Prepared, params: dict[str, Any]) -> list[dict[str, Any]]:
        """:meth:`fetchall` of a :class:`Prepared` statement (inside a transaction: plain SQL)."""
        return await self.fetchall(statement.sql, params)

    async def fetchone_prepared(self, statement: Prepared, params: dict[str, Any]) -> dict[str, Any] | None:
        rows = await self.fetchall_prepared(statement, params)
        return rows[0] if rows else None

    async def execute_prepared(self, statement: Prepared, params: dict[str, Any]) -> None:
        """:meth:`execute` of a :class:`Prepared` statement (inside a transaction: plain SQL)."""
        await self.execute(statement.sql, params)

    @property
    def rowcount(self) -> int:
        return self._cursor.rowcount

    async def notify(self, channel: str, payload: str) -> None:
        """Queue a NOTIFY; PostgreSQL delivers it to listeners only if the transaction commits."""
        await self._cursor.execute("SELECT pg_notify(%s, %s)", (channel, payload))

    def call_after(self, fn: Callable[[], Any]) -> None:
        """Run ``fn`` once the transaction has committed (never on rollback or retry)."""
        self.after_commit.append(fn)

    async def execute_locking(
        self, lock_order: str, sql: str, params: Sequence[Any] | dict[str, Any] | None = None
    ) -> None:
        """A write that takes an advisory lock held to the end of the transaction.

        A batched transaction sends such writes after all its other writes, ordered by
        ``lock_order`` (a group commit: across all members), so two transactions taking several
        of these locks take them in one order, and none holds one while it waits for a row
        lock (an account being deleted holds its agents' rows). A transaction of
        :meth:`Database.run` runs each statement as it comes, which would hold the lock through
        whatever follows: refused, use :meth:`Database.run_batched`.
        """
        raise TypeError("execute_locking needs Database.run_batched (its writes are sent last, in lock order)")

    async def report(self, sql: str, params: Sequence[Any] | dict[str, Any] | None = None) -> None:
        """Run a ``SELECT`` of one text column ``key`` after the transaction's writes and add
        what it returns to :attr:`reported`, readable once the transaction committed.

        WHY: a batched transaction's writes go out in one query whose results nobody reads;
        a write whose outcome PostgreSQL decides (a lease granted under a lock, see
        :func:`e2a.store.deliveries.insert_job_txn`) reports it this way, at no extra round trip.
        """
        self.reported.update(r["key"] for r in await self.fetchall(sql, params))


class Database:
    """A fixed-size pool of txpostgres connections with named, retried transactions."""

    def __init__(self, dsn: str, pool_size: int, reactor: Any) -> None:
        self._dsn = dsn
        self._reactor = reactor
        self._size = pool_size
        self._idle: list[txpostgres.Connection] = []
        self._semaphore = defer.DeferredSemaphore(pool_size)
        self._closed = False
        self._commits = GroupCommit(self)
        self._cancels = CancelRequests(dsn, reactor)
        # A connection whose statement a cancel request was sent for, and that request: the
        # connection goes back to the pool only once the request was delivered, so that it
        # never interrupts the next user's statement.
        self._cancelling: dict[txpostgres.Connection, Deferred[None]] = {}

    @property
    def dsn(self) -> str:
        return self._dsn

    @property
    def idle(self) -> int:
        """Connections in the pool, not checked out (for tests and diagnostics)."""
        return len(self._idle)

    def cancel_statement(self, conn: txpostgres.Connection) -> Deferred[None]:
        """Ask PostgreSQL to cancel the statement running on checked-out ``conn``; the
        connection returns to the pool only after the request was delivered. Fires then."""
        sent = self._cancelling.get(conn)
        if sent is None:
            sent = self._cancelling[conn] = self._cancels.send(conn)
        return sent

    async def start(self) -> None:
        """Open the pool; fails (DatabaseUnavailable) when the server cannot be reached."""
        for _ in range(self._size):
            self._idle.append(await self._connect())

    async def _connect(self) -> txpostgres.Connection:
        """A new pooled connection; its prepared statements keep one plan (see :class:`Prepared`).

        Its client encoding is UTF8 whatever the DSN or the server's default says: text goes
        out as UTF-8 and the server converts it, and psycopg2 never quotes a string for an
        encoding in which a backslash is not the octet 0x5C (with SHIFT_JIS_2004 and
        ``standard_conforming_strings`` off, quoted backslashes came back changed).
        """
        conn = PgConnection(reactor=self._reactor)
        try:
            await conn.connect(self._dsn, client_encoding="UTF8")
        except psycopg2.Error as e:
            raise DatabaseUnavailable(f"cannot connect to the database: {e}".strip()) from e
        try:
            await conn.runOperation("SET plan_cache_mode = force_generic_plan")
        except psycopg2.Error as e:
            conn.close()
            raise DatabaseUnavailable(f"cannot set up the database connection: {e}".strip()) from e
        return conn

    def discard_idle(self) -> None:
        """Close the idle connections (the server restarted: they all point at the dead one), so
        the next checkouts connect afresh instead of each failing once (e2a.store.embedded)."""
        idle, self._idle = self._idle, []
        for conn in idle:
            try:
                conn.close()
            except Exception:
                pass

    def close(self) -> None:
        self._closed = True
        for conn in self._idle:
            conn.close()
        self._idle.clear()

    async def _checkout(self, abort: AbortSignal | None = None, use: _Use | None = None) -> txpostgres.Connection:
        if self._closed:
            raise DatabaseUnavailable("database is shut down")
        acquired = self._semaphore.acquire()
        if use is not None:
            use.acquiring = acquired  # abandoning the work leaves the queue (_abandon)
        await (acquired if abort is None else abort.guard(acquired))
        try:
            conn = self._idle.pop() if self._idle else None
            if conn is None or conn.closed:
                conn = await self._connect()
            return conn
        except BaseException:
            self._semaphore.release()
            raise

    def _checkin(self, conn: txpostgres.Connection, broken: bool) -> None:
        pending = self._cancelling.pop(conn, None)
        if pending is not None:
            pending.addBoth(lambda _: self._checkin(conn, broken))
            return
        if broken or conn.closed or self._closed:
            try:
                conn.close()
            except Exception:
                pass
        else:
            self._idle.append(conn)
        self._semaphore.release()

    async def _on_connection(
        self, desc: str, body: Callable[[txpostgres.Connection], Awaitable[T]], abort: AbortSignal | None = None
    ) -> T:
        """Check a connection out, run ``body(conn)``, check it back in; the one place that
        retries serialization failures/deadlocks and maps a broken connection to
        :class:`DatabaseUnavailable` (and discards that connection).

        Cancelling the returned work fails it with ``CancelledError`` at once; what it was
        doing is abandoned (:meth:`_abandon`), never cancelled through txpostgres, whose
        cancel blocks the process until the server answers (see :class:`CancelRequests`).
        """
        use = _Use()
        work = Deferred.fromCoroutine(self._attempts(desc, body, abort, use))
        return await _shielded(work, lambda: self._abandon(use))

    def _abandon(self, use: _Use) -> None:
        """Nobody waits for ``use``'s work any more: a statement in flight is cancelled, and work
        still waiting for a connection stops when it gets one."""
        use.abandoned = True
        if use.conn is not None:
            self.cancel_statement(use.conn)
        elif use.acquiring is not None and not use.acquiring.called:
            # Still queued for a connection: leave the queue, so that abandoned callers
            # (every timed-out lookup of an outage) do not each take a slot when it ends.
            use.acquiring.cancel()

    async def _attempts(
        self, desc: str, body: Callable[[txpostgres.Connection], Awaitable[T]], abort: AbortSignal | None, use: _Use
    ) -> T:
        for attempt in range(1, MAX_ATTEMPTS + 1):
            conn = await self._checkout(abort, use)
            use.conn = conn
            broken = False
            try:
                if use.abandoned:
                    raise defer.CancelledError()
                return await body(conn)
            except psycopg2.Error as e:
                code = getattr(e, "pgcode", None)
                if code in RETRYABLE and attempt < MAX_ATTEMPTS and not use.abandoned:
                    log.debug("retrying {desc} after {code}", desc=desc, code=code)
                    continue
                if isinstance(e, (psycopg2.OperationalError, psycopg2.InterfaceError)) and code is None:
                    broken = True
                    raise DatabaseUnavailable(f"{desc}: database connection failed") from e
                raise
            except txpostgres.RollbackFailed as e:
                broken = True
                raise DatabaseUnavailable(f"{desc}: rollback failed") from e
            finally:
                use.conn = None
                self._checkin(conn, broken)
        raise AssertionError("unreachable")

    @staticmethod
    def _run_hooks(desc: str, hooks: list[Callable[[], Any]]) -> None:
        for fn in hooks:
            try:
                fn()
            except Exception:
                log.failure("after-commit hook of {desc} failed", desc=desc)

    async def run(self, desc: str, txn_fn: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
        """Run ``txn_fn(txn, *args, **kwargs)`` in one transaction, retrying on 40001/40P01.

        Raises:
            DatabaseUnavailable: the connection failed; nothing was committed that we know of.
        """
        txns: list[Txn] = []

        async def body(conn: txpostgres.Connection) -> T:
            def interaction(cursor: txpostgres.Cursor) -> Deferred[T]:
                txns.append(Txn(cursor))
                return Deferred.fromCoroutine(txn_fn(txns[-1], *args, **kwargs))

            return await conn.runInteraction(interaction)

        result = await self._on_connection(desc, body)
        self._run_hooks(desc, txns[-1].after_commit)
        return result

    async def _single(
        self, desc: str, sql: str | Prepared, params: Sequence[Any] | dict[str, Any] | None
    ) -> txpostgres.Cursor:
        """Run one statement on its own (autocommit: PostgreSQL makes it its own transaction).

        One round trip instead of the three of ``BEGIN``/statement/``COMMIT``; retries and
        error mapping are those of :meth:`run`. Returns the finished cursor.
        """

        async def body(conn: txpostgres.Connection) -> txpostgres.Cursor:
            cursor = conn.cursor()
            text = await _prepared_sql(cursor, sql) if isinstance(sql, Prepared) else sql
            await cursor.execute(text, params)
            return cursor

        return await self._on_connection(desc, body)

    async def fetchall(self, sql: str, params: Sequence[Any] | dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """A single statement, committed on its own (autocommit), as dict rows."""
        cursor = await self._single("select", sql, params)
        return _dict_rows(cursor)

    async def fetchone(self, sql: str, params: Sequence[Any] | dict[str, Any] | None = None) -> dict[str, Any] | None:
        rows = await self.fetchall(sql, params)
        return rows[0] if rows else None

    async def fetchall_prepared(self, statement: Prepared, params: dict[str, Any]) -> list[dict[str, Any]]:
        """:meth:`fetchall` of a :class:`Prepared` statement (planned once per connection)."""
        cursor = await self._single(statement.name, statement, params)
        return _dict_rows(cursor)

    async def fetchone_prepared(self, statement: Prepared, params: dict[str, Any]) -> dict[str, Any] | None:
        rows = await self.fetchall_prepared(statement, params)
        return rows[0] if rows else None

    async def execute(self, sql: str, params: Sequence[Any] | dict[str, Any] | None = None) -> None:
        await self._single("execute", sql, params)

    async def run_batched(
        self, desc: str, fn: Callable[..., Awaitable[T]], *args: Any, abort: AbortSignal | None = None, **kwargs: Any
    ) -> T:
        """Run ``fn(batch, ...)``: reads at once, every write in ONE atomic round trip at the end.

        For transactions whose reads need no isolation beyond READ COMMITTED (each statement
        sees the latest committed data, exactly as inside a default ``run`` transaction) and
        whose writes depend only on what was read. ``batch.fetch*`` run immediately as single
        statements; ``batch.execute``/``batch.notify`` are queued and sent together as one
        multi-statement query, which PostgreSQL executes as one implicit transaction: all
        writes (and NOTIFYs) commit together or not at all, and this returns only after that
        commit. Retries the whole function on 40001/40P01 like :meth:`run`; after-commit hooks
        run once, after the commit.

        The writes go through the group commit (:class:`GroupCommit`): the writes of batches
        that finish while another batch's commit is in flight are sent together, as one
        transaction, when it returns. That changes how many commits PostgreSQL makes, not what
        any one batch sees: a batch returns only after the transaction holding its writes
        committed, and when a shared transaction fails, every batch in it is sent again on its
        own, so an error reaches only the batch that caused it.

        ``abort``: once set, no further statement starts and the one in flight has its backend
        query cancelled (PostgreSQL's cancel request); this then raises :class:`Aborted` — or
        returns normally when the writes had already committed. Either way the answer is the
        transaction's real outcome, known before this returns.

        Raises:
            DatabaseUnavailable: the connection failed; nothing was committed that we know of.
            Aborted: ``abort`` was set and nothing was committed.
        """
        batches: list[BatchTxn] = []
        # What is left to send once the reads' connection is back in the pool: the writes,
        # and whether alone (True: a lock timeout in the slot) or through the group commit.
        left: list[tuple[Writes, bool]] = []
        reported: set[str] = set()

        async def reads(conn: txpostgres.Connection) -> T:
            batch = BatchTxn(conn.cursor(), _BackendCanceller(self, conn, abort) if abort else None)
            batches.append(batch)
            left.clear()
            try:
                result = await fn(batch, *args, **kwargs)
                writes = batch.take_writes()
                if writes and self._commits.claim():
                    # Nothing to share a commit with: send now on this connection, in the slot.
                    committed = False
                    try:
                        reported.update(await batch.send(writes, first=self._commits.lock_timeout_sql))
                        committed = True
                    except psycopg2.Error as e:
                        if getattr(e, "pgcode", None) != psycopg2.errorcodes.LOCK_NOT_AVAILABLE:
                            raise
                        left.append((writes, True))  # waits for the lock outside the slot
                    finally:
                        self._commits.release(committed)
                elif writes:
                    left.append((writes, False))
                return result
            finally:
                if batch.canceller is not None:
                    # The connection goes back to the pool only once a cancel request we
                    # sent has been delivered: it must never hit the next user's statement.
                    await batch.canceller.close()

        for attempt in range(1, MAX_ATTEMPTS + 1):
            result = await self._on_connection(desc, reads, abort)
            if left:
                writes, alone = left[0]
                try:
                    if alone:
                        reported.update(await self.send_writes(desc, writes, abort))
                    else:
                        reported.update(await self._commits.commit(desc, writes, abort))
                except psycopg2.Error as e:
                    code = getattr(e, "pgcode", None)
                    if code in RETRYABLE and attempt < MAX_ATTEMPTS:
                        log.debug("retrying {desc} after {code}", desc=desc, code=code)
                        continue
                    raise
            batches[-1].reported.update(reported)
            self._run_hooks(desc, batches[-1].after_commit)
            return result
        raise AssertionError("unreachable")

    async def send_writes(self, desc: str, writes: Writes, abort: AbortSignal | None) -> set[str]:
        """Send ``writes`` as one implicit transaction on a pooled connection, preparing the
        statements their ``EXECUTE``s need on it first. Returns once PostgreSQL committed, with
        the keys the writes' reports returned.

        Raises the statement's :class:`psycopg2.Error` (nothing committed),
        :class:`DatabaseUnavailable` (the connection broke: outcome unknown) or
        :class:`Aborted` (``abort`` set; the statement was never sent or was cancelled).
        """
        use = _Use()
        work = Deferred.fromCoroutine(self._send_writes(desc, writes, abort, use))
        return await _shielded(work, lambda: self._abandon(use))

    async def _send_writes(self, desc: str, writes: Writes, abort: AbortSignal | None, use: _Use) -> set[str]:
        conn = await self._checkout(abort, use)
        use.conn = conn
        broken = False
        try:
            if use.abandoned:
                raise defer.CancelledError()
            batch = BatchTxn(conn.cursor(), _BackendCanceller(self, conn, abort) if abort else None)
            try:
                return await batch.send(writes)
            finally:
                if batch.canceller is not None:
                    await batch.canceller.close()
        except psycopg2.Error as e:
            if isinstance(e, (psycopg2.OperationalError, psycopg2.InterfaceError)) and e.pgcode is None:
                broken = True
                raise DatabaseUnavailable(f"{desc}: database connection failed") from e
            raise
        finally:
            use.conn = None
            self._checkin(conn, broken)


def rolled_back(error: psycopg2.Error) -> bool:
    """Whether PostgreSQL's error certainly means the transaction did not commit, so its
    writes may be sent again: a statement error. Not so for a lost connection (no code), a
    connection exception (class 08), operator intervention such as a terminated backend (57,
    except a statement cancel, 57014), a system error (58) or an internal error (XX): there
    the commit may have happened (e.g. committed locally while a synchronous standby was
    awaited)."""
    code = getattr(error, "pgcode", None)
    if code is None:
        return False
    if code == psycopg2.errorcodes.QUERY_CANCELED:
        return True
    return not code.startswith(("08", "57", "58", "XX"))


@dataclass
class _Use:
    """The connection one unit of work holds (None: none yet, or given back), and whether its
    caller stopped waiting for it."""

    conn: txpostgres.Connection | None = None
    abandoned: bool = False
    #: The wait for a pool slot (cancelled when the work is abandoned while queued).
    acquiring: Deferred[Any] | None = None


def _shielded(work: Deferred[T], abandon: Callable[[], None]) -> Deferred[T]:
    """A Deferred with ``work``'s result whose ``cancel()`` calls ``abandon`` and fails it with
    ``CancelledError`` at once, while ``work`` itself runs on to its end.

    WHY: cancelling txpostgres's Deferreds sends PostgreSQL's cancel request through psycopg2's
    ``connection.cancel()``, which waits for the server holding the GIL: a server that stopped
    answering (a frozen host, a network partition) froze the whole process, health check
    included. Its Deferred then fires only once the server answers, so a timeout could not
    end the wait either.
    """

    def cancel(_: Deferred[T]) -> None:
        abandon()  # Deferred.cancel then fails the Deferred with CancelledError

    shield: Deferred[T] = Deferred(cancel)

    def settle(result: T | Failure) -> None:
        if shield.called:
            if isinstance(result, Failure):
                if result.check(defer.CancelledError, psycopg2.Error, TransientError):
                    log.debug("abandoned database work ended: {error}", error=result.getErrorMessage())
                else:
                    log.failure("abandoned database work failed", result)
        elif isinstance(result, Failure):
            shield.errback(result)
        else:
            shield.callback(result)

    work.addBoth(settle)
    return shield


class CancelRequests:
    """Cancels a backend's running statement without blocking: ``pg_cancel_backend(pid)`` over
    a connection of its own, asynchronous like every other.

    WHY not libpq's cancel request (psycopg2 ``connection.cancel()``): it waits for the server
    while holding the GIL, even from a thread, so a server that accepts connections but does
    not answer (stopped, overloaded, a network dropping its packets) stopped every thread of
    e2a until it answered. This costs a full connection per cancel, which is rare (a timeout, an
    abort, a client gone). It needs the right to signal the backend, which a role has over its
    own sessions.
    """

    def __init__(self, dsn: str, reactor: Any, max_in_flight: int = MAX_CANCELS_IN_FLIGHT) -> None:
        self._dsn = dsn
        self._reactor = reactor
        self._slots = defer.DeferredSemaphore(max_in_flight)

    def send(self, conn: txpostgres.Connection) -> Deferred[None]:
        """Ask PostgreSQL to cancel what ``conn``'s backend is running; fires once the request
        was delivered, or could not be (logged; never fails)."""
        if conn.pollable() is None or conn.pollable().closed:
            return defer.succeed(None)
        pid = conn.pollable().get_backend_pid()  # known since connecting: no round trip
        d = self._slots.run(lambda: Deferred.fromCoroutine(self._cancel(pid)))

        def done(result: None | Failure) -> None:
            if isinstance(result, Failure):
                log.warn("cancel request for backend {pid} failed: {error}", pid=pid, error=result.getErrorMessage())

        d.addBoth(done)
        return d

    async def _cancel(self, pid: int) -> None:
        conn = PgConnection(reactor=self._reactor)
        try:
            await conn.connect(self._dsn)
            [(signalled,)] = await conn.runQuery("SELECT pg_cancel_backend(%s)", (pid,))
            if not signalled:
                log.warn("cancel request for backend {pid} found no such backend (a pooler in between?)", pid=pid)
        finally:
            if conn.pollable() is not None and not conn.pollable().closed:
                conn.close()


@dataclass
class Writes:
    """A batch's queued writes: the statements (sent as one implicit transaction) and the
    prepared statements whose ``EXECUTE`` they contain, which must exist on whichever pooled
    connection sends them."""

    sql: list[bytes] = field(default_factory=list)
    needs: list[Prepared] = field(default_factory=list)
    #: Writes that take an advisory lock, with their lock order (:meth:`Txn.execute_locking`).
    locking: list[tuple[str, bytes]] = field(default_factory=list)
    #: ``SELECT``s of one text column ``key``, run after every write (:meth:`Txn.report`).
    reports: list[bytes] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.sql or self.locking or self.reports)

    def statements(self, first: bytes | None = None) -> bytes:
        """The one query that sends these writes: ``first``, the writes, the locking writes in
        lock order, then the reports joined into one final ``SELECT`` (whose rows are the
        query's result)."""
        parts = self.sql if first is None else [first, *self.sql]
        if self.locking:
            parts = [*parts, *(sql for _order, sql in sorted(self.locking, key=lambda w: w[0]))]
        if self.reports:
            parts = [*parts, b" UNION ALL ".join(b"(" + r + b")" for r in self.reports)]
        return b";\n".join(parts)


class _Member:
    """One batch waiting in the group commit; ``done`` fires when its writes committed."""

    __slots__ = ("abort", "desc", "done", "writes")

    def __init__(self, desc: str, writes: Writes, abort: AbortSignal | None) -> None:
        self.desc = desc
        self.writes = writes
        self.abort = abort
        self.done: Deferred[set[str]] = Deferred()


#: How long a write sent in the group commit's slot may wait for a row lock (seconds) before
#: it is rolled back and its batches are sent again on their own, outside the slot.
GROUP_LOCK_TIMEOUT = 0.1


class GroupCommit:
    """Leader/follower group commit for :meth:`Database.run_batched`.

    WHY: a commit costs PostgreSQL far more CPU than the few rows of one accepted message
    (transaction start and end, the commit record, the WAL flush, one query's protocol round
    trip): in a measurement on two cores, single-row write transactions cost 0.28–0.40 ms of
    PostgreSQL CPU per row, and the same rows four to a transaction 0.16–0.21 ms.

    How: a batch whose writes are ready is sent at once when no commit is in flight — no
    timer, so a lone message waits for nothing — on the connection that ran its reads
    (:meth:`claim`; a version that always queued and checked out a second connection showed
    more reactor CPU per message). While a commit is in flight, batches queue;
    when it returns, everything queued is sent as one multi-statement query (one implicit
    transaction, one commit), up to ``max_members`` batches or ``max_bytes`` of SQL. Under load
    the groups grow by themselves to what arrived during one commit.

    Failure isolation: if the shared transaction fails with a statement error (PostgreSQL
    rolled all of it back, :func:`rolled_back`), each member is sent again on its own, so only
    the batch whose statement fails gets the error. A broken connection or a terminated
    backend leaves the outcome unknown for every member (as for a lone batch), so each gets
    that error (:class:`DatabaseUnavailable` for a lost connection) and none is resent.
    A member's :class:`AbortSignal` withdraws it while it waits; once its group is in flight
    the signal cancels the group's query in PostgreSQL, the aborted member gets
    :class:`Aborted`, and the others are sent again on their own.

    Head-of-line: only ``max_in_flight`` commits are in flight, so a commit stuck on a row lock
    (an account being deleted holds its agents' rows, and every message insert checks its
    agent's row) would hold up every tenant's mail. Everything sent in the slot therefore runs
    with ``lock_timeout`` (:data:`GROUP_LOCK_TIMEOUT`): past it the transaction is rolled back
    and its batches are sent again on their own, outside the slot, where they wait for the lock
    as long as it takes (or until their abort). Resends never occupy the slot.
    """

    def __init__(
        self,
        db: Database,
        *,
        max_in_flight: int = 1,
        max_members: int = 64,
        max_bytes: int = 8 << 20,
        lock_timeout: float = GROUP_LOCK_TIMEOUT,
    ) -> None:
        self._db = db
        self._max_in_flight = max_in_flight
        self._max_members = max_members
        self._max_bytes = max_bytes
        #: The statement every transaction sent in the slot starts with.
        self.lock_timeout_sql = f"SET LOCAL lock_timeout = {int(lock_timeout * 1000)}".encode()
        self._pending: list[_Member] = []
        self._in_flight = 0
        #: Transactions that committed and the batches they carried (for tests; never reset).
        self.commits = 0
        self.batches = 0

    async def commit(self, desc: str, writes: Writes, abort: AbortSignal | None = None) -> set[str]:
        """Return once ``writes`` committed (alone or in a group), with the keys their reports
        returned (a group's: every member's, so a member looks up its own); raise what
        :meth:`Database.send_writes` raises for them."""
        if abort is not None:
            abort.check()
        member = _Member(desc, writes, abort)
        self._pending.append(member)
        withdraw = abort.on_request(lambda: self._withdraw(member)) if abort is not None else None
        self._start()
        try:
            return await member.done
        finally:
            if withdraw is not None:
                withdraw()

    def claim(self) -> bool:
        """Take the slot when it is free and no batch waits for it: the caller then sends its
        writes at once, on the connection it already holds (no second checkout), with
        :attr:`lock_timeout_sql` first, and calls :meth:`release` when PostgreSQL answered.
        The common case when mail arrives one message at a time."""
        if self._in_flight < self._max_in_flight and not self._pending:
            self._in_flight += 1
            return True
        return False

    def release(self, committed: bool) -> None:
        """The slot taken by :meth:`claim` is free again; whatever queued meanwhile goes out."""
        self._in_flight -= 1
        if committed:
            self.commits += 1
            self.batches += 1
        self._start()

    def _withdraw(self, member: _Member) -> None:
        if member in self._pending:
            self._pending.remove(member)
            member.done.errback(Aborted())

    def _take(self) -> list[_Member]:
        group = [self._pending[0]]
        size = _size(group[0].writes)
        for member in self._pending[1:]:
            more = _size(member.writes)
            if len(group) >= self._max_members or size + more > self._max_bytes:
                break
            group.append(member)
            size += more
        del self._pending[: len(group)]
        return group

    def _start(self) -> None:
        while self._pending and self._in_flight < self._max_in_flight:
            group = self._take()
            self._in_flight += 1
            Deferred.fromCoroutine(self._send(group)).addBoth(self._sent)

    def _sent(self, result: object) -> None:
        self._in_flight -= 1
        if isinstance(result, Failure):
            log.failure("group commit failed unexpectedly", result)
        self._start()

    async def _send(self, group: list[_Member]) -> None:
        """Send one group (or one lone batch) in the slot; see the class docstring."""
        if len(group) == 1:
            signal, withdraws = group[0].abort, []
        else:
            signal = AbortSignal()
            withdraws = [m.abort.on_request(signal.request) for m in group if m.abort is not None]
        joined = Writes([self.lock_timeout_sql])
        for m in group:
            joined.sql.extend(m.writes.sql)
            joined.needs.extend(st for st in m.writes.needs if st not in joined.needs)
            joined.locking.extend(m.writes.locking)
            joined.reports.extend(m.writes.reports)
        try:
            reported = await self._db.send_writes(group[0].desc if len(group) == 1 else "group_commit", joined, signal)
        except (psycopg2.Error, Aborted) as e:
            if isinstance(e, psycopg2.Error) and not rolled_back(e):
                self._fail(group, e)  # the outcome is unknown: nothing may be sent again
                return
            lock_wait = getattr(e, "pgcode", None) == psycopg2.errorcodes.LOCK_NOT_AVAILABLE
            if len(group) == 1 and not lock_wait:
                self._fail(group, e)  # the batch's own error (or its own abort)
                return
            # Rolled back as a whole: each member again on its own, outside the slot (so one
            # that waits on a lock holds up neither the others nor the next group), and an
            # error or an abort reaches only the batch it belongs to.
            for m in group:
                if m.abort is not None and m.abort.requested:
                    m.done.errback(Aborted())
                else:
                    Deferred.fromCoroutine(self._alone(m))
        except BaseException as e:
            self._fail(group, e)
        else:
            self.commits += 1
            self.batches += len(group)
            for m in group:
                m.done.callback(reported)
        finally:
            for withdraw in withdraws:
                withdraw()

    async def _alone(self, member: _Member) -> None:
        """Send one member's writes on their own, with no lock timeout (a resend)."""
        try:
            reported = await self._db.send_writes(member.desc, member.writes, member.abort)
        except BaseException as e:
            member.done.errback(Failure(e))
        else:
            self.commits += 1
            self.batches += 1
            member.done.callback(reported)

    @staticmethod
    def _fail(group: list[_Member], error: BaseException) -> None:
        for m in group:
            m.done.errback(Failure(error))


def _size(writes: Writes) -> int:
    return sum(map(len, writes.sql)) + sum(len(sql) for _o, sql in writes.locking) + sum(map(len, writes.reports))


def _dict_rows(cursor: txpostgres.Cursor) -> list[dict[str, Any]]:
    if cursor.description is None:
        return []
    names = [c.name for c in cursor.description]
    return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


class _BackendCanceller:
    """Cancels the statement running on one connection when an :class:`AbortSignal` is set.

    The cancel request goes through :meth:`Database.cancel_statement` (never blocking); a
    cancel that reaches an idle backend is ignored by PostgreSQL. :meth:`statement` wraps every
    statement: none starts once the signal is set, and a statement the cancel interrupted
    raises :class:`Aborted`.
    """

    def __init__(self, db: Database, conn: txpostgres.Connection, abort: AbortSignal) -> None:
        self._db = db
        self._conn = conn
        self.abort = abort
        self._running = False
        self._sent: Deferred[None] | None = None

    def _on_abort(self) -> None:
        if self._running and self._sent is None:
            self._sent = self._db.cancel_statement(self._conn)

    async def statement(self, run: Callable[[], Awaitable[T]]) -> T:
        """Run one statement under the signal (see the class docstring)."""
        self.abort.check()
        self._running = True
        withdraw = self.abort.on_request(self._on_abort)
        try:
            return await run()
        except (defer.CancelledError, psycopg2.extensions.QueryCanceledError):
            if self.abort.requested:
                raise Aborted("statement cancelled on abort, rolled back") from None
            raise
        finally:
            self._running = False
            withdraw()

    async def close(self) -> None:
        if self._sent is not None:
            await self._sent


class BatchTxn(Txn):
    """The ``txn`` of :meth:`Database.run_batched`: reads now, writes queued for one round trip.

    ``execute``/``notify`` only queue (client-side interpolated with psycopg2's ``mogrify``,
    which is what ``execute`` does anyway); :meth:`flush` sends the queue as one query.
    ``rowcount`` of a queued write is not available. With a ``canceller`` (an abort signal)
    every statement goes through :meth:`_BackendCanceller.statement`, and a read that returns
    after the signal was set still raises :class:`Aborted` (only the commit may win the race).
    """

    def __init__(self, cursor: txpostgres.Cursor, canceller: _BackendCanceller | None = None) -> None:
        super().__init__(cursor)
        self._queued: list[bytes] = []
        self._needs: list[Prepared] = []
        self._locking: list[tuple[str, bytes]] = []
        self._reports: list[bytes] = []
        self.canceller = canceller

    async def _run(self, sql: str | bytes, params: Sequence[Any] | dict[str, Any] | None = None) -> None:
        if self.canceller is None:
            await self._cursor.execute(sql, params)
            return
        await self.canceller.statement(lambda: self._cursor.execute(sql, params))

    async def _prepared(self, statement: Prepared) -> str:
        if self.canceller is None:
            return await _prepared_sql(self._cursor, statement)
        return await self.canceller.statement(lambda: _prepared_sql(self._cursor, statement))

    async def fetchall(self, sql: str, params: Sequence[Any] | dict[str, Any] | None = None) -> list[dict[str, Any]]:
        await self._run(sql, params)
        if self.canceller is not None:
            self.canceller.abort.check()
        return _dict_rows(self._cursor)

    async def execute(self, sql: str, params: Sequence[Any] | dict[str, Any] | None = None) -> None:
        self._queued.append(self._cursor.mogrify(sql, params))

    async def notify(self, channel: str, payload: str) -> None:
        await self.execute("SELECT pg_notify(%s, %s)", (channel, payload))

    async def fetchall_prepared(self, statement: Prepared, params: dict[str, Any]) -> list[dict[str, Any]]:
        """Reads run at once, outside any transaction: the prepared form is used."""
        await self._run(await self._prepared(statement), params)
        if self.canceller is not None:
            self.canceller.abort.check()
        return _dict_rows(self._cursor)

    async def execute_prepared(self, statement: Prepared, params: dict[str, Any]) -> None:
        """Queue an ``EXECUTE``; the connection that sends the writes prepares it first (once
        per connection, as its own statement)."""
        if statement not in self._needs:
            self._needs.append(statement)
        self._queued.append(self._cursor.mogrify(statement.execute_sql, params))

    @property
    def rowcount(self) -> int:
        raise TypeError("rowcount is not available for batched writes")

    async def execute_locking(
        self, lock_order: str, sql: str, params: Sequence[Any] | dict[str, Any] | None = None
    ) -> None:
        """Queued after the other writes, in lock order (see :meth:`Txn.execute_locking`)."""
        self._locking.append((lock_order, self._cursor.mogrify(sql, params)))

    async def report(self, sql: str, params: Sequence[Any] | dict[str, Any] | None = None) -> None:
        """Queued like a write; its keys reach :attr:`reported` after the commit."""
        self._reports.append(self._cursor.mogrify(sql, params))

    async def send(self, writes: Writes, first: bytes | None = None) -> set[str]:
        """Send ``writes`` (after ``first``, when given) as one implicit transaction on this
        batch's connection, under its abort signal, preparing what their ``EXECUTE``s need on
        this connection first. Returns the keys their reports returned."""
        for statement in writes.needs:
            await self._prepared(statement)
        await self._run(writes.statements(first))
        return {r["key"] for r in _dict_rows(self._cursor)} if writes.reports else set()

    def take_writes(self) -> Writes:
        """The queued writes, for :meth:`Database.run_batched` to commit (empty when none)."""
        writes = Writes(self._queued, self._needs, self._locking, self._reports)
        self._queued, self._needs, self._locking, self._reports = [], [], [], []
        return writes


def quote_dsn_value(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def dsn_with_dbname(dsn: str, dbname: str) -> str:
    """Return ``dsn`` pointing at another database (used by tests and the admin tooling)."""
    params = psycopg2.extensions.parse_dsn(dsn)
    params["dbname"] = dbname
    return " ".join(f"{k}={quote_dsn_value(str(v))}" for k, v in params.items())
