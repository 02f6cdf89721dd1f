"""Rows the store contract tests build on (straight SQL: the stores under test must not be used
to set up what they are tested on)."""

from __future__ import annotations

from typing import Any

from e2a.store.database import Database
from tests.support.apiserver import insert_user_with_key

#: Mail octets every writer must store unchanged (e2a.store.database.octets_params): what could
#: trip the text form (quotes, backslashes, dollar quotes, escape-like sequences, psycopg2's own
#: placeholders, every 7-bit octet but NUL) and what must take the bytea form (8-bit octets,
#: NUL, invalid UTF-8), small and large.
MAIL_OCTETS = (
    b"",
    b"Subject: hi\r\n\r\nbody\r\n",
    b"quote ' backslash \\ E'\\x41' $$ -- ; \\000 \\\\ %s %(x)s\r\n",
    b"dollars $ $$ $1 $e2a$ $e2a_octets $e2a_octets$ $$e2a_octets$$ ', 'x') --\r\n",
    b"e2a_octets$ at the start, and at the end $e2a_octets",
    b"$",
    b"e2a_octets$ at the start, $e2a_octets cut short, a dollar at the end $",
    bytes(range(1, 128)),
    b"caf\xc3\xa9\r\n",
    b"\xff\xfe\x00\x80",
    bytes(range(256)) * 40,
    b"7-bit line of base64 payload AAAA\r\n" * 3000,
)


async def stored_octets(db: Database, message_id: str, column: str) -> tuple[int, str]:
    """(octet length, SHA-256 hex) of a message's octets column, as PostgreSQL computes them."""
    row = await db.fetchone(
        f"SELECT octet_length({column}) AS size, encode(sha256({column}), 'hex') AS digest"
        " FROM messages WHERE id = %s",
        (message_id,),
    )
    return row["size"], row["digest"]


async def user_with_agent(
    db: Database,
    address: str = "Bot@agents.test",
    *,
    verified: bool = True,
    mode: str = "cloud",
    email: str = "owner@example.com",
) -> tuple[str, str]:
    """A user, the domain of ``address`` and the agent; returns (user_id, agent id)."""
    user_id, _key = await insert_user_with_key(db, email)
    domain = address.split("@")[1]

    async def _txn(txn: Any) -> None:
        await txn.execute(
            "INSERT INTO domains (domain, user_id, verified) VALUES (%s, %s, %s) ON CONFLICT DO NOTHING",
            (domain, user_id, verified),
        )
        await txn.execute(
            "INSERT INTO agents (id, user_id, domain, agent_mode, webhook_url, webhook_status)"
            " VALUES (%s, %s, %s, %s, %s, %s)",
            (address, user_id, domain, mode, "https://hook.example/in" if mode == "cloud" else "",
             "active" if mode == "cloud" else "none"),
        )

    await db.run("test_user_with_agent", _txn)
    return user_id, address


async def agent_with_due_jobs(db: Database, n: int, *, due_ago_seconds: float = 60.0) -> tuple[str, str]:
    """A user and a cloud agent with ``n`` inbound messages, each with a pending, unleased
    delivery job due ``due_ago_seconds`` ago (``dlv_00`` the oldest created); returns (user_id,
    agent id)."""
    user_id, agent = await user_with_agent(db)
    for i in range(n):
        await db.execute(
            "INSERT INTO messages (id, agent_id, user_id, direction, status) VALUES (%s, %s, %s, 'inbound', 'unread')",
            (f"msg_{i}", agent, user_id),
        )
        await db.execute(
            "INSERT INTO deliveries (id, message_id, agent_id, webhook_url, status, next_attempt_at, created_at)"
            " VALUES (%s, %s, %s, 'https://hook.example/in', 'pending', now() - make_interval(secs => %s),"
            " now() - make_interval(secs => %s))",
            (f"dlv_{i:02d}", f"msg_{i}", agent, due_ago_seconds, 1000 - i),
        )
    return user_id, agent

