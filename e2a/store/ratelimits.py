"""Fixed-window rate-limit counters in PostgreSQL, shared by every e2a process (api.md §0.8).

A window is ``[floor(now / w) * w, … + w)`` in epoch seconds. Counting is one upsert
(``INSERT … ON CONFLICT DO UPDATE SET count = count + 1 RETURNING count``), so two processes
hitting the same bucket at once serialise on the row and neither loses a count. Every attempt
counts, including refused ones (the register limit must count them, and a client hammering
past its limit gains nothing from it).

Old windows of a bucket are deleted when that bucket opens a new window (at most one extra
statement per bucket per window); :func:`delete_expired` sweeps buckets nobody touches again.
"""

from __future__ import annotations

import math

from e2a.errors import RateLimited
from e2a.store.database import Database, Txn

__all__ = ["delete_expired", "hit", "window_start"]


def window_start(now: float, window_seconds: int) -> int:
    """Start of the fixed window holding ``now`` (epoch seconds)."""
    return int(math.floor(now / window_seconds) * window_seconds)


async def _hit_txn(txn: Txn, bucket: str, start: int) -> int:
    count = await txn.fetchval(
        "INSERT INTO rate_limits (bucket, window_start, count) VALUES (%s, to_timestamp(%s), 1)"
        " ON CONFLICT (bucket, window_start) DO UPDATE SET count = rate_limits.count + 1"
        " RETURNING count",
        (bucket, start),
    )
    if count == 1:
        # First hit of a new window: the bucket's earlier windows are dead.
        await txn.execute(
            "DELETE FROM rate_limits WHERE bucket = %s AND window_start < to_timestamp(%s)",
            (bucket, start),
        )
    return int(count)


async def hit(db: Database, bucket: str, limit: int, window_seconds: int, now: float) -> None:
    """Count one request against ``bucket`` (e.g. ``register:<ip>``).

    Args:
        limit: allowed requests per window; ``<= 0`` disables the limit (nothing is counted).
        window_seconds: window length in seconds.
        now: current time, epoch seconds (from the injected clock).

    Raises:
        RateLimited: 429 ``rate_limited``; ``Retry-After`` = seconds until the window ends.
    """
    if limit <= 0:
        return
    start = window_start(now, window_seconds)
    count = await db.run("rate_limit_hit", _hit_txn, bucket, start)
    if count > limit:
        retry_after = max(1, math.ceil(start + window_seconds - now))
        raise RateLimited(retry_after)


async def delete_expired(db: Database, now: float, max_window_seconds: int = 86400) -> int:
    """Delete windows that ended before ``now`` for any window up to ``max_window_seconds``.

    Returns the number of rows deleted (for a periodic cleanup job).
    """

    async def _delete_txn(txn: Txn) -> int:
        await txn.execute(
            "DELETE FROM rate_limits WHERE window_start < to_timestamp(%s)",
            (now - max_window_seconds,),
        )
        return txn.rowcount

    return await db.run("rate_limit_sweep", _delete_txn)
