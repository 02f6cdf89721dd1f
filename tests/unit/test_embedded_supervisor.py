"""The embedded PostgreSQL's supervisor (restart with back-off) and the root reachability rules,
with a fake clock and fake processes (e2a.store.embedded)."""

from __future__ import annotations

import os
import stat

import pytest

from twisted.internet import defer
from twisted.internet.task import Clock

from e2a.store.embedded import Supervisor, can_read, can_search, pid_alive, unreachable_message


class FakeServer:
    def __init__(self) -> None:
        self.alive = True
        self.attempts = 0
        self.fail_next = 0
        self.pending: defer.Deferred[None] | None = None

    async def restart(self) -> None:
        self.attempts += 1
        if self.fail_next:
            self.fail_next -= 1
            raise RuntimeError("pg_ctl failed (1): shared memory still in use\nmore")
        self.alive = True


def _supervisor(server: FakeServer, clock: Clock, hooks: list[str]) -> Supervisor:
    sup = Supervisor(
        clock, lambda: server.alive, server.restart, [lambda: hooks.append("pool"), lambda: hooks.append("listen")],
        interval=1.0, backoff=(0.5, 1.0, 2.0),
    )
    sup.start()
    return sup


def test_supervisor_leaves_a_live_server_alone():
    """While the postmaster lives nothing is restarted and no hook runs."""
    server, clock, hooks = FakeServer(), Clock(), []
    _supervisor(server, clock, hooks)
    clock.pump([1.0] * 10)
    assert server.attempts == 0 and hooks == []


def test_supervisor_restarts_a_dead_server_and_runs_the_hooks():
    """Dead at the next check: restarted at once, then the pool and LISTEN hooks run once."""
    server, clock, hooks = FakeServer(), Clock(), []
    sup = _supervisor(server, clock, hooks)
    server.alive = False
    clock.advance(1.0)
    assert server.attempts == 1 and server.alive
    assert hooks == ["pool", "listen"] and sup.restarts == 1


def test_supervisor_backs_off_between_failed_restarts():
    """Failed attempts are retried after 0.5, 1, 2, 2 … seconds (the last delay repeats)."""
    server, clock, hooks = FakeServer(), Clock(), []
    sup = _supervisor(server, clock, hooks)
    server.alive = False
    server.fail_next = 4
    clock.advance(1.0)  # check → attempt 1 fails
    assert server.attempts == 1
    for delay, attempts in ((0.5, 2), (1.0, 3), (2.0, 4), (2.0, 5)):
        clock.advance(delay - 0.01)
        assert server.attempts == attempts - 1
        clock.advance(0.01)
        assert server.attempts == attempts
    assert server.alive and hooks == ["pool", "listen"] and sup.failures == 0


@pytest.mark.parametrize("fail_next", [0, 2])
def test_supervisor_stop_cancels_pending_checks(fail_next):
    """After stop nothing more runs, whether it was waiting to check or to retry."""
    server, clock, hooks = FakeServer(), Clock(), []
    sup = _supervisor(server, clock, hooks)
    server.alive = False
    server.fail_next = fail_next
    if fail_next:
        clock.advance(1.0)
    d = defer.ensureDeferred(sup.stop())
    assert d.called
    attempts = server.attempts
    clock.pump([1.0] * 30)
    assert server.attempts == attempts


def _stat(mode: int, uid: int, gid: int) -> os.stat_result:
    return os.stat_result((stat.S_IFDIR | mode, 0, 0, 0, uid, gid, 0, 0, 0, 0))


@pytest.mark.parametrize(
    ("mode", "uid", "gid", "expected"),
    [
        (0o700, 0, 0, False),  # root's private directory
        (0o701, 0, 0, True),  # others may traverse
        (0o710, 0, 995, True),  # the user's group may traverse
        (0o710, 0, 0, False),  # another group
        (0o100, 999, 0, True),  # the user owns it
        (0o077, 999, 995, False),  # owner class decides for the owner, even if others may
    ],
)
def test_can_search_uses_the_class_that_applies(mode, uid, gid, expected):
    """Owner bits for the owner, group bits for members, other bits for the rest."""
    assert can_search(_stat(mode, uid, gid), 999, [995]) is expected


def test_can_read_uses_the_read_bits():
    """Read, not traverse, bits decide readability."""
    assert can_read(_stat(0o604, 0, 0), 999, [995])
    assert not can_read(_stat(0o601, 0, 0), 999, [995])


def test_unreachable_message_is_one_line_with_the_fix():
    """Names the directory in the way and both fixes (normal user, another data_dir)."""
    from pathlib import Path

    text = unreachable_message(Path("/root/e2a/e2a-data"), Path("/root"))
    assert "\n" not in text and "/root is not searchable" in text
    assert "run e2a as a normal user" in text and "data_dir" in text and "database.url" in text


def test_pid_alive_for_self_and_for_nothing():
    """This process is alive; no pid, or a pid that cannot exist, is not."""
    assert pid_alive(os.getpid())
    assert not pid_alive(None)
    assert not pid_alive(2**22 + 1)
