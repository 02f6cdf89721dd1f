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
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import psycopg2
import psycopg2.errorcodes
import psycopg2.extensions
from txpostgres import txpostgres

from twisted.internet import defer, threads
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from e2a.abort import Aborted, AbortSignal
from e2a.errors import TransientError

log = Logger()

T = TypeVar("T")

RETRYABLE = {
    psycopg2.errorcodes.SERIALIZATION_FAILURE,  # 40001
    psycopg2.errorcodes.DEADLOCK_DETECTED,  # 40P01
}
MAX_ATTEMPTS = 5


class DatabaseUnavailable(TransientError):
    """The database could not be reached or the connection broke mid-transaction."""


_PARAM = re.compile(r"%%|%\((\w+)\)s")


class Prepared:
    """A statement PostgreSQL parses and plans once per connection (``PREPARE``/``EXECUTE``).

    Written like any other statement here (psycopg2 ``%(name)s`` parameters). On the hot
    ingest path the planning of the same few statements was a large share of PostgreSQL's CPU
    per message; a prepared statement is planned once per pooled connection. Only statements
    run outside an explicit transaction (:meth:`Database.fetchall_prepared`, the reads and
    writes of :meth:`Database.run_batched`) use the prepared form, and the ``PREPARE`` is always
    its own statement, so a rolled-back transaction can never leave a statement half known.
    Inside :meth:`Database.run` the plain SQL runs (same result).
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


class Database:
    """A fixed-size pool of txpostgres connections with named, retried transactions."""

    def __init__(self, dsn: str, pool_size: int, reactor: Any) -> None:
        self._dsn = dsn
        self._reactor = reactor
        self._size = pool_size
        self._idle: list[txpostgres.Connection] = []
        self._semaphore = defer.DeferredSemaphore(pool_size)
        self._closed = False

    @property
    def dsn(self) -> str:
        return self._dsn

    async def start(self) -> None:
        """Open the pool; fails (DatabaseUnavailable) when the server cannot be reached."""
        for _ in range(self._size):
            self._idle.append(await self._connect())

    async def _connect(self) -> txpostgres.Connection:
        conn = txpostgres.Connection(reactor=self._reactor)
        try:
            await conn.connect(self._dsn)
        except psycopg2.Error as e:
            raise DatabaseUnavailable(f"cannot connect to the database: {e}".strip()) from e
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

    async def _checkout(self, abort: AbortSignal | None = None) -> txpostgres.Connection:
        if self._closed:
            raise DatabaseUnavailable("database is shut down")
        acquired = self._semaphore.acquire()
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
        :class:`DatabaseUnavailable` (and discards that connection)."""
        for attempt in range(1, MAX_ATTEMPTS + 1):
            conn = await self._checkout(abort)
            broken = False
            try:
                return await body(conn)
            except psycopg2.Error as e:
                code = getattr(e, "pgcode", None)
                if code in RETRYABLE and attempt < MAX_ATTEMPTS:
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

        ``abort``: once set, no further statement starts and the one in flight has its backend
        query cancelled (PostgreSQL's cancel request); this then raises :class:`Aborted` — or
        returns normally when the writes had already committed. Either way the answer is the
        transaction's real outcome, known before this returns.

        Raises:
            DatabaseUnavailable: the connection failed; nothing was committed that we know of.
            Aborted: ``abort`` was set and nothing was committed.
        """
        batches: list[BatchTxn] = []

        async def body(conn: txpostgres.Connection) -> T:
            batch = BatchTxn(conn.cursor(), _BackendCanceller(conn, self._reactor, abort) if abort else None)
            batches.append(batch)
            try:
                result = await fn(batch, *args, **kwargs)
                await batch.flush()
            finally:
                if batch.canceller is not None:
                    # The connection goes back to the pool only once a cancel request we sent
                    # has been delivered: it must never hit the next user's statement.
                    await batch.canceller.close()
            return result

        result = await self._on_connection(desc, body, abort)
        self._run_hooks(desc, batches[-1].after_commit)
        return result


def _dict_rows(cursor: txpostgres.Cursor) -> list[dict[str, Any]]:
    if cursor.description is None:
        return []
    names = [c.name for c in cursor.description]
    return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


class _BackendCanceller:
    """Cancels the statement running on one connection when an :class:`AbortSignal` is set.

    PostgreSQL's cancel request (libpq ``PQcancel``, through psycopg2 ``connection.cancel``)
    opens a connection of its own and blocks, so it runs in a thread; a cancel that reaches an
    idle backend is ignored by PostgreSQL. :meth:`statement` wraps every statement: none starts
    once the signal is set, and a statement the cancel interrupted raises :class:`Aborted`.
    """

    def __init__(self, conn: txpostgres.Connection, reactor: Any, abort: AbortSignal) -> None:
        self._conn = conn
        self._reactor = reactor
        self.abort = abort
        self._running = False
        self._sent: Deferred[None] | None = None

    def _on_abort(self) -> None:
        if self._running and self._sent is None:
            pg = self._conn.pollable()
            self._sent = threads.deferToThreadPool(self._reactor, self._reactor.getThreadPool(), pg.cancel)
            self._sent.addErrback(lambda f: log.warn("cancel request failed: {e}", e=str(f.value)))

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
        """Queue an ``EXECUTE`` (the ``PREPARE``, once per connection, runs now on its own)."""
        self._queued.append(self._cursor.mogrify(await self._prepared(statement), params))

    @property
    def rowcount(self) -> int:
        raise TypeError("rowcount is not available for batched writes")

    async def flush(self) -> None:
        """Send every queued write as one implicit transaction (no-op when nothing is queued)."""
        if not self._queued:
            return
        queued, self._queued = self._queued, []
        await self._run(b";\n".join(queued))


def quote_dsn_value(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def dsn_with_dbname(dsn: str, dbname: str) -> str:
    """Return ``dsn`` pointing at another database (used by tests and the admin tooling)."""
    params = psycopg2.extensions.parse_dsn(dsn)
    params["dbname"] = dbname
    return " ".join(f"{k}={quote_dsn_value(str(v))}" for k, v in params.items())
