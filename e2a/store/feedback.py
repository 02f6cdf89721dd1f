"""Feedback submissions (api.md §3.5): insert and the retention purge."""

from __future__ import annotations

from e2a.store.database import Database, Txn


async def _insert_feedback_txn(
    txn: Txn, feedback_id: str, user_id: str | None, email: str, category: str, message: str, client_ip: str
) -> None:
    await txn.execute(
        "INSERT INTO feedback (id, user_id, email, category, message, client_ip)"
        " VALUES (%s, %s, %s, %s, %s, %s)",
        (feedback_id, user_id, email, category, message, client_ip),
    )


async def insert_feedback(
    db: Database, feedback_id: str, *, user_id: str | None, email: str, category: str, message: str, client_ip: str
) -> None:
    """Store one submission under ``feedback_id``."""
    await db.run(
        "store_feedback", _insert_feedback_txn, feedback_id, user_id, email, category, message, client_ip
    )


async def purge_older_than(db: Database, days: int) -> None:
    """Retention (mail.md §9): drop feedback older than ``days``; one statement, safe to run anywhere."""
    await db.execute("DELETE FROM feedback WHERE created_at < now() - make_interval(days => %(days)s)", {"days": days})
