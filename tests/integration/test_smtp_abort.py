"""Issue 15.2, the session's half: at ``store_timeout`` an accept that honours the abort signal
is waited for, and the reply is its real outcome (task.Clock for the timers)."""

from __future__ import annotations

import pytest
import pytest_twisted

from twisted.internet import defer, reactor, task

from e2a.abort import Aborted
from e2a.smtp.server import ABORT_GRACE
from e2a.smtp.session import PROBE_TIMEOUT
from tests.support.smtpharness import SmtpHarness

GOOD = b"From: a@sender.test\r\nSubject: hi\r\n\r\nhello\r\n"


@pytest_twisted.async_yield_fixture
async def env():
    harness = SmtpHarness()
    yield harness
    await harness.close()


async def _start(env, outcome, probe=None):
    """A session whose accept honours the abort; ``outcome(abort)`` decides what it does
    once the signal is set; ``probe``: the accept's ``abort.probe``. Returns (client, clock,
    the accept's envelope list)."""
    clock = task.Clock()
    seen = []

    async def accept(envelope, raw):
        envelope.abort.handled = True
        envelope.abort.probe = probe
        seen.append(envelope)
        d: defer.Deferred[str] = defer.Deferred()
        envelope.abort.on_request(lambda: outcome(d))
        return await d

    env.accept = accept
    port = env.start(clock=clock, store_timeout=30)
    client = await env.connect(port)
    assert (await client.command("EHLO client.test")).code == 250
    assert (await client.command("MAIL FROM:<a@sender.test>")).code == 250
    assert (await client.command("RCPT TO:<bot@agents.test>")).code == 250
    assert (await client.command("DATA")).code == 354
    client.send(GOOD + b".\r\n")
    while not seen:
        await task.deferLater(reactor, 0, lambda: None)
    return client, clock, seen


@pytest.mark.parametrize(
    ("finish", "expected"),
    [
        (lambda d: reactor.callLater(0.05, d.callback, "msg_committed"), "250 2.0.0 Ok: queued as msg_committed"),
        (lambda d: reactor.callLater(0.05, d.errback, Aborted()), "451 4.3.0 Temporary failure, try again later"),
    ],
    ids=["commit-won", "rolled-back"],
)
@pytest_twisted.ensureDeferred
async def test_store_timeout_reply_follows_real_outcome(env, finish, expected):
    """The signal is set at store_timeout; no reply until the accept finishes; then its outcome."""
    client, clock, seen = await _start(env, finish)
    clock.advance(30)
    assert seen[0].abort.requested
    assert not client.replies  # nothing answered before the outcome is known
    assert str(await client.reply()) == expected
    assert str(await client.command("NOOP")) == "250 2.0.0 Ok"


@pytest_twisted.ensureDeferred
async def test_accept_ignoring_its_abort_is_given_up_after_grace(env):
    """An accept that promised to honour the signal but never finishes: 451 after ABORT_GRACE."""
    client, clock, _seen = await _start(env, lambda d: None)
    clock.advance(30)
    await task.deferLater(reactor, 0.05, lambda: None)
    assert not client.replies
    clock.advance(ABORT_GRACE)
    assert (await client.reply()).code == 451


def _probe(committed):
    """``abort.probe`` of an accept whose copies are (``committed``: the first id) or are not
    (None) stored; a Deferred stands for a read still on its way."""
    return lambda: committed if isinstance(committed, defer.Deferred) else defer.succeed(committed)


@pytest_twisted.ensureDeferred
async def test_given_up_accept_whose_copies_committed_gets_250(env):
    """Residual of 15.2: the accept's writes committed but its cancel request is still on its
    way past ABORT_GRACE; the probe finds the first id: 250 with it, not 451."""
    client, clock, _seen = await _start(env, lambda d: None, _probe("msg_committed"))
    clock.advance(30)
    await task.deferLater(reactor, 0.05, lambda: None)
    assert not client.replies
    clock.advance(ABORT_GRACE)
    assert str(await client.reply()) == "250 2.0.0 Ok: queued as msg_committed"
    assert str(await client.command("NOOP")) == "250 2.0.0 Ok"


@pytest_twisted.ensureDeferred
async def test_aborted_accept_whose_copies_committed_gets_250(env):
    """Residual of 15.2: PostgreSQL said "canceled" for a statement whose COMMIT was applied
    (the accept raises Aborted): the probe finds the id, 250."""
    client, clock, _seen = await _start(
        env, lambda d: reactor.callLater(0.05, d.errback, Aborted()), _probe("msg_committed")
    )
    clock.advance(30)
    assert str(await client.reply()) == "250 2.0.0 Ok: queued as msg_committed"


@pytest_twisted.ensureDeferred
async def test_probe_that_finds_nothing_or_hangs_answers_451(env):
    """Rolled back (the probe finds no copy) → 451; a probe that never answers is waited
    for PROBE_TIMEOUT only, then 451."""
    client, clock, _seen = await _start(env, lambda d: reactor.callLater(0.05, d.errback, Aborted()), _probe(None))
    clock.advance(30)
    assert (await client.reply()).code == 451

    hanging: defer.Deferred[str | None] = defer.Deferred()
    client, clock, _seen = await _start(env, lambda d: reactor.callLater(0, d.errback, Aborted()), _probe(hanging))
    clock.advance(30)
    await task.deferLater(reactor, 0.05, lambda: None)
    assert not client.replies
    clock.advance(PROBE_TIMEOUT)
    assert (await client.reply()).code == 451
