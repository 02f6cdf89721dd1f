"""Who stops the embedded PostgreSQL: the process holding ``<data_dir>/pg.lock``, whether it
started the server or adopted one left by a crashed e2a; a second user leaves it running."""

from __future__ import annotations

import pytest

from e2a.store.embedded import EmbeddedPostgres, EmbeddedSettings, pid_alive
from tests.support.dirs import reachable_tmpdir

pytestmark = pytest.mark.slow


def test_second_user_of_a_live_server_leaves_it_running():
    """B finds A's lock held: B uses the server, B's stop leaves it running, A's stop stops it."""
    pgdata = reachable_tmpdir("e2a-own-") / "data" / "pg"
    a = EmbeddedPostgres(EmbeddedSettings(pgdata))
    a.thd_start()
    try:
        b = EmbeddedPostgres(EmbeddedSettings(pgdata))
        b.thd_start()
        assert a.owns_server and not b.owns_server
        assert b.postmaster_pid == a.postmaster_pid
        b.thd_stop()
        assert pid_alive(a.postmaster_pid)
    finally:
        a.thd_stop()
    assert not pid_alive(a.postmaster_pid)


def test_adopted_server_of_a_dead_owner_is_stopped_by_the_adopter():
    """A's lock vanishes without a stop (as after kill -9); B adopts the running server, owns
    it, and B's clean stop stops it."""
    pgdata = reachable_tmpdir("e2a-adopt-") / "data" / "pg"
    a = EmbeddedPostgres(EmbeddedSettings(pgdata))
    a.thd_start()
    a._release_lock()  # what the kernel does when the owner dies
    b = EmbeddedPostgres(EmbeddedSettings(pgdata))
    b.thd_start()
    try:
        assert b.owns_server and b.postmaster_pid == a.postmaster_pid
    finally:
        b.thd_stop()
    assert not pid_alive(a.postmaster_pid)
    assert not (pgdata / "postmaster.pid").exists()
