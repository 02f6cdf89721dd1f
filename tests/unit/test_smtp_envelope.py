"""Table tests for MAIL FROM / RCPT TO parsing (mail.md §1.4) and the reply mapping."""

from __future__ import annotations

import pytest

from e2a.smtp.envelope import (
    MailFrom,
    ParameterSyntaxError,
    PathSyntaxError,
    RecipientRefused,
    UnknownParameter,
    parse_mail_from,
    parse_rcpt_to,
)
from e2a.smtp.server import connection_key, envelope_error_reply


@pytest.mark.parametrize(
    ("arg", "expected"),
    [
        ("FROM:<a@b.test>", MailFrom("a@b.test")),
        ("from: <a@b.test>", MailFrom("a@b.test")),
        ("FROM:<>", MailFrom("")),
        ("FROM:<@r1.test,@r2.test:a@b.test>", MailFrom("a@b.test")),
        ('FROM:<"a b>c"@b.test>', MailFrom('"a b>c"@b.test')),
        ("FROM:<a@[192.0.2.1]>", MailFrom("a@[192.0.2.1]")),
        ("FROM:<a@b.test> SIZE=100 body=8bitmime", MailFrom("a@b.test", 100, "8BITMIME")),
        ("FROM:<a@b.test> BODY=7BIT", MailFrom("a@b.test", None, "7BIT")),
    ],
)
def test_parse_mail_from_accepts(arg, expected):
    """Valid reverse-paths and parameters parse to the address and declared values."""
    assert parse_mail_from(arg) == expected


@pytest.mark.parametrize(
    ("arg", "error"),
    [
        ("FROM:a@b.test", PathSyntaxError),
        ("TO:<a@b.test>", PathSyntaxError),
        ("FROM:<a@b.test", PathSyntaxError),
        ("FROM:<a@b.test>x", PathSyntaxError),
        ("FROM:<a b@c.test>", PathSyntaxError),
        ("FROM:<a@b.test.>", PathSyntaxError),
        ("FROM:<a..b@c.test>", PathSyntaxError),
        ("FROM:<a@-b.test>", PathSyntaxError),
        ("FROM:<" + "a" * 65 + "@b.test>", PathSyntaxError),
        ("FROM:<a@" + "b" * 60 + ("." + "c" * 60) * 4 + ">", PathSyntaxError),
        ("FROM:<\u00e9@b.test>", PathSyntaxError),
        ("FROM:<a@b.test> SIZE=abc", ParameterSyntaxError),
        ("FROM:<a@b.test> SIZE", ParameterSyntaxError),
        ("FROM:<a@b.test> BODY=BINARYMIME", ParameterSyntaxError),
        ("FROM:<a@b.test> SIZE=1 SIZE=2", ParameterSyntaxError),
        ("FROM:<a@b.test> SMTPUTF8", UnknownParameter),
        ("FROM:<a@b.test> RET=HDRS", UnknownParameter),
    ],
)
def test_parse_mail_from_rejects(arg, error):
    """Malformed reverse-paths and parameters raise the class the server maps to a reply."""
    with pytest.raises(error):
        parse_mail_from(arg)


@pytest.mark.parametrize(
    ("arg", "expected"),
    [
        ("TO:<bot@agents.test>", "bot@agents.test"),
        ("to: <Bot@Agents.TEST>", "Bot@agents.test"),
        ("TO:<postmaster@agents.test>", "postmaster@agents.test"),
        ("TO:<a.b+c@xn--bcher-kva.test>", "a.b+c@xn--bcher-kva.test"),
    ],
)
def test_parse_rcpt_to_accepts(arg, expected):
    """Forward-paths that may name an agent return the lookup address, domain lowercased."""
    assert parse_rcpt_to(arg) == expected


@pytest.mark.parametrize(
    ("arg", "error"),
    [
        ("TO:<>", PathSyntaxError),
        ("TO:bot@agents.test", PathSyntaxError),
        ("TO:<bot>", PathSyntaxError),
        ("TO:<bot@agents.test> NOTIFY=NEVER", UnknownParameter),
        ('TO:<"bot"@agents.test>', RecipientRefused),
        ("TO:<bot%x@agents.test>", RecipientRefused),
        ("TO:<x!bot@agents.test>", RecipientRefused),
        ("TO:<bot@x@agents.test>", RecipientRefused),
        ("TO:<bot@[127.0.0.1]>", RecipientRefused),
        ("TO:<bot@agents.test.>", RecipientRefused),
        ("TO:<@relay.test:bot@agents.test>", RecipientRefused),
        ("TO:<postmaster>", RecipientRefused),
        ("TO:<PostMaster>", RecipientRefused),
        ("TO:<bot@agents..test>", PathSyntaxError),
        ("TO:<b ot@agents.test>", PathSyntaxError),
    ],
)
def test_parse_rcpt_to_rejects(arg, error):
    """Forward-paths that are malformed or can never be an agent raise their error class."""
    with pytest.raises(error):
        parse_rcpt_to(arg)


@pytest.mark.parametrize(
    ("error", "command", "reply"),
    [
        (PathSyntaxError(), "MAIL", "501 5.1.7"),
        (PathSyntaxError(), "RCPT", "501 5.1.3"),
        (UnknownParameter(), "MAIL", "555 5.5.4"),
        (ParameterSyntaxError(), "MAIL", "501 5.1.7"),
        (RecipientRefused(), "RCPT", "550 5.1.1"),
    ],
)
def test_envelope_error_reply_table(error, command, reply):
    """Each envelope error maps to the §1.6 reply."""
    r = envelope_error_reply(error, command=command)
    assert f"{r.code} {r.text}".startswith(reply)


@pytest.mark.parametrize(
    ("ip", "key"),
    [
        ("192.0.2.1", "192.0.2.1"),
        ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"),
        ("2001:db8:1:2::ffff", "2001:db8:1:2::/64"),
        ("::ffff:192.0.2.1", "192.0.2.1"),
        ("fe80::1%eth0", "fe80::/64"),
    ],
)
def test_connection_key_groups_ipv6_per_64(ip, key):
    """Per-IP limits count IPv4 addresses singly and IPv6 per /64."""
    assert connection_key(ip) == key
