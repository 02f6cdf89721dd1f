"""Issue 15.7: a header section whose first line starts with SP/TAB is refused over real SMTP.

e2a writes its own ``Authentication-Results:`` and ``Received:`` in front of the received
header section (mail.md §1.8); a leading continuation line would fold into e2a's Received:
field and let the sender write inside e2a's trace. Refused with 550 5.6.0, never accepted.
"""

from __future__ import annotations

import pytest
import pytest_twisted

from tests.support.smtpharness import SmtpHarness


@pytest_twisted.async_yield_fixture
async def env():
    harness = SmtpHarness()
    yield harness
    await harness.close()


@pytest.mark.parametrize(
    "head",
    [
        b"\tby evil.example with ESMTP id forged; Mon, 1 Jan 2026 00:00:00 +0000\r\n",
        b" for <ceo@bank.example>\r\n",
        b"\t\r\n",
    ],
    ids=["tab-trace", "space-for", "tab-only"],
)
@pytest_twisted.ensureDeferred
async def test_leading_continuation_line_refused_550(env, head):
    """A first header line starting with SP/TAB → 550 5.6.0; nothing reaches accept; the
    session goes on (NOOP answered)."""
    port = env.start()
    client = await env.connect(port)
    assert (await client.command("EHLO client.test")).code == 250
    assert (await client.command("MAIL FROM:<a@sender.test>")).code == 250
    assert (await client.command("RCPT TO:<bot@agents.test>")).code == 250
    assert (await client.command("DATA")).code == 354
    client.send(head + b"From: a@sender.test\r\nSubject: hi\r\n\r\nbody\r\n.\r\n")
    reply = await client.reply()
    assert (reply.code, reply.enhanced) == (550, "5.6.0"), reply
    assert env.accepted == []
    assert str(await client.command("NOOP")) == "250 2.0.0 Ok"


@pytest_twisted.ensureDeferred
async def test_continuation_after_first_field_still_accepted(env):
    """Folding after a field is ordinary RFC 5322 and stays accepted byte for byte."""
    port = env.start()
    client = await env.connect(port)
    assert (await client.command("EHLO client.test")).code == 250
    assert (await client.command("MAIL FROM:<a@sender.test>")).code == 250
    assert (await client.command("RCPT TO:<bot@agents.test>")).code == 250
    assert (await client.command("DATA")).code == 354
    content = b"Subject: hi\r\n\tthere\r\nFrom: a@sender.test\r\n\r\nbody\r\n"
    client.send(content + b".\r\n")
    assert (await client.reply()).code == 250
    assert env.accepted[0][1] == content
