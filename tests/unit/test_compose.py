"""Outbound rules of e2a/outbound/compose.py: recipient normalisation (mail.md §7.2), content
validation (api.md §0.11, §2.2), reply plans (api.md §5.3), composition (mail.md §7.4) and
DATA preparation (mail.md §7.6)."""

from __future__ import annotations

import base64
import email
import email.policy
import itertools
import quopri
import re
from datetime import UTC, datetime, timedelta, timezone
from email.header import decode_header, make_header
from email.utils import parseaddr

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from e2a.errors import BadRequest
from e2a.outbound import compose as c
from e2a.outbound.compose import Attachment

M = "e2a.example"
AGENT = "bot@agents.example"
MSG_ID = "msg_" + "ab" * 16
DATE = datetime(2026, 4, 27, 12, 5, 0, tzinfo=UTC)


def counter_hex():
    """A deterministic random_hex: 000…0, 000…1, …"""
    n = itertools.count()
    return lambda: f"{next(n):032x}"


def compose(**kw):
    args = dict(message_id=MSG_ID, mail_domain=M, agent_address=AGENT, agent_name="Bot", to=["a@x.example"],
                subject="Hello", body_text="Hi there", date=DATE, random_hex=counter_hex())
    args.update(kw)
    return c.compose_message(**args)


def parse(raw: bytes):
    return email.message_from_bytes(raw, policy=email.policy.default)


def header_block(raw: bytes) -> str:
    return raw.split(b"\r\n\r\n", 1)[0].decode("ascii")


def unfolded(raw: bytes) -> dict[str, str]:
    out = {}
    for field in re.split(r"\r\n(?![ \t])", header_block(raw)):
        name, _, value = field.partition(":")
        out[name] = value.replace("\r\n", "")[1:] if value.startswith(" ") else value.replace("\r\n", "")
    return out


def mime_parts(raw: bytes) -> list[bytes]:
    """The top-level header section + preamble, then each body part (headers and body) of a
    multipart message, split at its e2a_ delimiter lines."""
    return re.split(rb"\r\n--e2a_[0-9a-f]{32}(?:--)?\r\n", raw)[:-1]


def assert_crlf_only(raw: bytes) -> None:
    assert b"\r" not in raw.replace(b"\r\n", b""), "bare CR"
    assert b"\n" not in raw.replace(b"\r\n", b""), "bare LF"


def unstuff(data: bytes) -> bytes:
    assert data.endswith(b"\r\n.\r\n") or data == b".\r\n"
    body = data[:-3]
    lines = body.split(b"\r\n")
    return b"\r\n".join(line[1:] if line.startswith(b".") else line for line in lines)


def raises(code, fn, *args, **kw):
    with pytest.raises(BadRequest) as exc:
        fn(*args, **kw)
    assert exc.value.code == code, exc.value.message
    assert exc.value.status == 400
    return exc.value


# ====================================================================== recipients (§7.2)

RECIPIENT_CASES = [
    # (to, cc, bcc, kind, expected (to, cc, bcc), why)
    (["a@x.example"], [], [], "send", (["a@x.example"], [], []), "plain"),
    (["Alice <Alice@X.Example>"], [], [], "send", (["alice@x.example"], [], []), "display name dropped, lowercased"),
    (['"Doe, J" <j@x.example>'], [], [], "send", (["j@x.example"], [], []), "quoted display name with comma"),
    (["", "  ", "a@x.example"], ["\t"], [""], "send", (["a@x.example"], [], []), "blanks dropped"),
    (["a@x.example", "A@x.example"], [], [], "send", (["a@x.example"], [], []), "dedupe within To"),
    (["a@x.example"], ["a@x.example", "b@x.example"], ["b@x.example", "c@x.example"], "send",
     (["a@x.example"], ["b@x.example"], ["c@x.example"]), "dedupe across lists To > Cc > Bcc"),
    ([], ["b@x.example", "B@X.EXAMPLE"], [], "send", ([], ["b@x.example"], []), "Cc only is enough"),
    ([AGENT, "a@x.example"], [AGENT.upper()], [AGENT], "send", (["a@x.example"], [], []), "sender removed everywhere"),
    ([AGENT, "a@x.example"], [], [], "reply", (["a@x.example"], [], []), "sender removed for replies"),
    ([AGENT], [], [], "test", ([AGENT], [], []), "test keeps the agent itself"),
    (["b@x.example", "a@x.example", "b@x.example"], [], [], "send", (["b@x.example", "a@x.example"], [], []),
     "first occurrence order kept"),
    (['"a b"@x.example'], [], [], "send", (['"a b"@x.example'], [], []), "quoted local part"),
    (["a@X.Example."], [], [], "send", (["a@x.example"], [], []), "domain normalised, trailing dot removed"),
]


@pytest.mark.parametrize(("to", "cc", "bcc", "kind", "expected", "why"), RECIPIENT_CASES)
def test_recipients_normalised_when_valid(to, cc, bcc, kind, expected, why):
    """Each §7.2 normalisation step holds."""
    r = c.normalise_recipients(to, cc, bcc, AGENT, kind=kind)
    assert (list(r.to), list(r.cc), list(r.bcc)) == expected, why
    assert r.envelope == r.to + r.cc + r.bcc


@pytest.mark.parametrize(
    ("to", "cc", "bcc", "why"),
    [
        ([], [], [], "nothing"),
        ([], [], ["b@x.example"], "Bcc only"),
        ([AGENT], [AGENT], [], "only the sender"),
        (["", " "], [None] and [], [], "only blanks"),
        (None, None, ["b@x.example"], "None lists"),
    ],
)
def test_recipients_refused_when_no_to_or_cc(to, cc, bcc, why):
    """No To/Cc left after normalisation → no_recipients."""
    raises("no_recipients", c.normalise_recipients, to, cc, bcc, AGENT)


def test_recipients_refused_naming_own_address_when_only_the_sender():
    """Only the sender's own address (any case) → no_recipients saying it is the agent's own address."""
    err = raises("no_recipients", c.normalise_recipients, [AGENT.upper()], [], ["b@x.example"], AGENT)
    assert AGENT in err.message and "own address" in err.message
    err = raises("no_recipients", c.normalise_recipients, [], [], ["b@x.example"], AGENT)
    assert "own address" not in err.message


def test_recipients_refused_when_over_max():
    """51 distinct recipients (across lists) → too_many_recipients; 50 pass."""
    addrs = [f"u{i}@x.example" for i in range(51)]
    assert len(c.normalise_recipients(addrs[:20], addrs[20:40], addrs[40:50], AGENT).envelope) == 50
    raises("too_many_recipients", c.normalise_recipients, addrs[:20], addrs[20:40], addrs[40:51], AGENT)
    raises("too_many_recipients", c.normalise_recipients, addrs[:3], [], [], AGENT, max_recipients=2)


def test_recipients_counted_after_dedupe_when_capping():
    """Duplicates and the sender do not count towards the cap."""
    addrs = [f"u{i}@x.example" for i in range(50)]
    r = c.normalise_recipients(addrs + [AGENT], addrs, addrs, AGENT)
    assert len(r.envelope) == 50


@pytest.mark.parametrize(
    ("entry", "code"),
    [
        ("not-an-address", "invalid_address"),
        ("a@", "invalid_address"),
        ("@x.example", "invalid_address"),
        ("a@@x.example", "invalid_address"),
        ("<@route:a@x.example>", "invalid_address"),
        ("group: a@x.example;", "invalid_address"),
        ("a@[127.0.0.1]", "invalid_address"),
        ("jörg@x.example", "invalid_address"),
        ("a@bücher.example", "invalid_address"),
        ("a@x.example, b@x.example", "invalid_address"),
        ("a@x.example\r\nBcc: evil@x.example", "invalid_header_value"),
        ("a@x.example\n", "invalid_header_value"),
        ("a\x00@x.example", "invalid_header_value"),
    ],
)
@pytest.mark.parametrize("field", ["to", "cc", "bcc"])
def test_recipients_refused_when_entry_bad(entry, code, field):
    """An unparseable entry in any list → invalid_address (controls → invalid_header_value)."""
    lists = {"to": ["ok@x.example"], "cc": [], "bcc": []}
    lists[field] = lists[field] + [entry]
    raises(code, c.normalise_recipients, lists["to"], lists["cc"], lists["bcc"], AGENT)


def test_recipients_reject_unknown_kind():
    """A kind outside send/reply/test is a programming error."""
    with pytest.raises(ValueError):
        c.normalise_recipients(["a@x.example"], [], [], AGENT, kind="bounce")


# ====================================================================== content (§0.11, §2.2)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


@pytest.mark.parametrize(
    ("subject", "expected"),
    [("Hello", "Hello"), ("  padded \t", "padded"), ("tab\tinside", "tab\tinside"), ("é" * 998, "é" * 998),
     (" " + "x" * 998 + " ", "x" * 998), ("", ""), (None, "")],
)
def test_subject_accepted_and_trimmed(subject, expected):
    """Subjects are trimmed; ≤ 998 characters (not octets) pass; TAB is allowed."""
    assert c.validate_content(subject, "b").subject == expected


HEADER_INJECTIONS = ["a\r\nBcc: evil@x.example", "a\nX: y", "a\rb", "a\x00b", "a\x1bb", "a\x7fb", "\r\n"]


@pytest.mark.parametrize("value", HEADER_INJECTIONS)
def test_subject_refused_when_control_chars(value):
    """CR, LF, NUL, ESC, DEL in a subject → invalid_header_value."""
    raises("invalid_header_value", c.validate_content, value, "b")


def test_subject_refused_when_too_long():
    """999 characters after trimming → invalid_field."""
    raises("invalid_field", c.validate_content, "x" * 999, "b")


@pytest.mark.parametrize(
    ("conv", "expected"),
    [(None, ""), ("", ""), ("   ", ""), (" abc ", "abc"), ("a b~!", "a b~!"), ("x" * 256, "x" * 256),
     (" " + "x" * 256 + " ", "x" * 256)],
)
def test_conversation_id_accepted_and_trimmed(conv, expected):
    """1-256 printable ASCII after trimming; empty means none."""
    assert c.validate_content("s", "b", conversation_id=conv).conversation_id == expected


@pytest.mark.parametrize(
    ("conv", "code"),
    [("x" * 257, "invalid_field"), ("café", "invalid_field"), ("a\tb", "invalid_field"),
     ("conv\r\nBcc: evil@x.example", "invalid_header_value"), ("c\n", "invalid_header_value"),
     ("c\x00", "invalid_header_value")],
)
def test_conversation_id_refused_when_bad(conv, code):
    """Non-printable, non-ASCII or over-long ids are refused with the spec's code."""
    raises(code, c.validate_content, "s", "b", conversation_id=conv)


@pytest.mark.parametrize(
    ("content_type", "expected"),
    [
        ("", "application/octet-stream"),
        (None, "application/octet-stream"),
        ("application/pdf", "application/pdf"),
        ("Image/PNG", "image/png"),
        ("text/plain; charset=utf-8", "text/plain; charset=utf-8"),
        ("text/plain;charset=\"utf-8\" ;  format=flowed", 'text/plain; charset="utf-8"; format=flowed'),
        ("application/vnd.openxmlformats-officedocument.wordprocessingml.document",
         "application/vnd.openxmlformats-officedocument.wordprocessingml.document"),
        ("application/x-foo+json", "application/x-foo+json"),
        ('text/plain; name="a \\"b\\".txt"', 'text/plain; name="a \\"b\\".txt"'),
    ],
)
def test_content_type_normalised_when_valid(content_type, expected):
    """RFC 2045 type/subtype tokens with optional parameters; empty → octet-stream."""
    att = {"filename": "f", "content_type": content_type, "data": b64(b"x")}
    assert c.validate_content("s", "b", attachments=[att]).attachments[0].content_type == expected


@pytest.mark.parametrize(
    ("content_type", "code"),
    [
        ("pdf", "invalid_attachment"),
        ("application/", "invalid_attachment"),
        ("/pdf", "invalid_attachment"),
        ("application/pdf;", "invalid_attachment"),
        ("application/pdf; charset", "invalid_attachment"),
        ("text/plain; charset=a b", "invalid_attachment"),
        ("text/pl ain", "invalid_attachment"),
        ("text/plain; a=\"unterminated", "invalid_attachment"),
        ("tëxt/plain", "invalid_attachment"),
        ("a/b/c", "invalid_attachment"),
        ("multipart/mixed; boundary=x", "invalid_attachment"),
        ("text/plain; x=" + "y" * 300, "invalid_attachment"),
        ("text/plain\r\nBcc: evil@x.example", "invalid_header_value"),
        ("text/plain\n", "invalid_header_value"),
        ("text/plain\x00", "invalid_header_value"),
    ],
)
def test_content_type_refused_when_bad(content_type, code):
    """Malformed content types → invalid_attachment; controls → invalid_header_value."""
    att = {"filename": "f", "content_type": content_type, "data": b64(b"x")}
    raises(code, c.validate_content, "s", "b", attachments=[att])


@pytest.mark.parametrize(
    ("filename", "code"),
    [("", "invalid_attachment"), (None, "invalid_attachment"), ("x" * 256, "invalid_attachment"),
     ("a\r\nBcc: evil@x.example", "invalid_header_value"), ("a\nb", "invalid_header_value"),
     ("a\x00b", "invalid_header_value"), ("a\x7f", "invalid_header_value")],
)
def test_filename_refused_when_bad(filename, code):
    """Filenames are 1-255 characters of header-bound text."""
    raises(code, c.validate_content, "s", "b", attachments=[{"filename": filename, "data": ""}])


@pytest.mark.parametrize("filename", ["a", "x" * 255, "résumé.pdf", 'quo"te\\.txt', "tab\tname", " spaced "])
def test_filename_kept_when_valid(filename):
    """Valid filenames are kept exactly as given."""
    got = c.validate_content("s", "b", attachments=[{"filename": filename, "data": ""}]).attachments[0]
    assert got.filename == filename


@pytest.mark.parametrize(
    ("data", "expected"),
    [("", b""), ("eA==", b"x"), ("eHk=", b"xy"), ("eHl6", b"xyz"), (b64(bytes(range(256))), bytes(range(256)))],
)
def test_attachment_data_decoded_when_strict_base64(data, expected):
    """Standard padded base64 decodes to the file bytes."""
    got = c.validate_content("s", "b", attachments=[{"filename": "f", "data": data}]).attachments[0]
    assert got.data == expected


@pytest.mark.parametrize(
    "data",
    ["eA", "eHk", "eA=", "eA===", "eA==eA==", "e A==", "eA==\n", "eHl6\r\neHl6", "eA-_", "eA__", "!!!!",
     "=eA=", "eHl6 ", "\teHl6", None],
)
def test_attachment_data_refused_when_not_strict_base64(data):
    """Missing padding, whitespace, URL-safe alphabet, junk → invalid_attachment."""
    raises("invalid_attachment", c.validate_content, "s", "b", attachments=[{"filename": "f", "data": data}])


def test_attachments_capped_at_100():
    """100 attachments pass; 101 → invalid_field."""
    att = {"filename": "f", "data": ""}
    assert len(c.validate_content("s", "b", attachments=[att] * 100).attachments) == 100
    raises("invalid_field", c.validate_content, "s", "b", attachments=[att] * 101)


@pytest.mark.parametrize(
    ("kwargs", "why"),
    [
        ({"attachments": ["notanobject"]}, "attachment not an object"),
        ({"attachments": [{"filename": 1, "data": ""}]}, "filename not a string"),
        ({"attachments": [{"filename": "f", "data": 5}]}, "data not a string"),
        ({"attachments": "x"}, "attachments not a list"),
        ({"body_html": 3}, "html not a string"),
        ({"subject": "\ud800"}, "lone surrogate in subject"),
        ({"body_text": "a\udfffb"}, "lone surrogate in body"),
    ],
)
def test_content_refused_when_wrong_type(kwargs, why):
    """Wrong JSON types and unencodable text → invalid_request_body, never a 500."""
    args = {"subject": "s", "body_text": "b"}
    args.update(kwargs)
    raises("invalid_request_body", c.validate_content, **args)


def test_content_returned_normalised():
    """The returned Content carries trimmed values and decoded attachments."""
    got = c.validate_content(" S ", "body\n", "<p>x</p>", " conv ",
                             [{"filename": "a.bin", "content_type": "", "data": "AAE="}])
    assert got == c.Content("S", "body\n", "<p>x</p>", "conv",
                            (Attachment("a.bin", "application/octet-stream", b"\x00\x01"),))


# ====================================================================== replies (§5.3)


def raw_message(**headers: str) -> bytes:
    lines = [f"{k.replace('_', '-')}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\nbody\r\n").encode("utf-8")


ORIGINAL = raw_message(
    From="Alice <alice@x.example>",
    To="Bot <bot@agents.example>, carol@y.example",
    Cc="dave@z.example, BOT@agents.example",
    Subject="Question",
    Message_ID="<orig-1@x.example>",
    References="<root@x.example> <mid@x.example>",
)


def plan(raw=ORIGINAL, **kw):
    args = dict(original_raw=raw, original_subject="Question", original_display_from="alice@x.example",
                original_conversation_id="conv-1", agent_address=AGENT)
    args.update(kw)
    return c.reply_plan(**args)


@pytest.mark.parametrize(
    ("raw", "display", "expected", "why"),
    [
        (ORIGINAL, "fallback@x.example", ("alice@x.example",), "From"),
        (raw_message(From="a@x.example", Reply_To="Lists <list@x.example>"), "", ("list@x.example",), "Reply-To wins"),
        (raw_message(From="a@x.example", Reply_To="r1@x.example, r2@x.example"), "", ("r1@x.example", "r2@x.example"),
         "all Reply-To addresses"),
        (raw_message(From="a@x.example", Reply_To="not an address"), "", ("a@x.example",), "bad Reply-To → From"),
        (raw_message(From="garbage", Subject="x"), "d@x.example", ("d@x.example",), "bad From → display sender"),
        (raw_message(Subject="no from"), "d@x.example", ("d@x.example",), "no From → display sender"),
        (None, "d@x.example", ("d@x.example",), "no raw → display sender"),
        (b"", "d@x.example", ("d@x.example",), "empty raw → display sender"),
        (raw_message(From="=?utf-8?q?J=C3=B6rg?= <J@X.example>"), "", ("j@x.example",), "encoded name, lowercased"),
        (None, "", (), "nothing at all"),
    ],
)
def test_reply_to_derived_from_original(raw, display, expected, why):
    """To = Reply-To, else From, of the stored raw message; else the stored display sender."""
    assert plan(raw, original_display_from=display).to == expected, why


def test_reply_all_adds_original_to_and_cc_then_extra_cc():
    """reply_all: original To + Cc go to Cc, then the request cc; normalisation drops the agent."""
    p = plan(reply_all=True, extra_cc=["eve@w.example"], bcc=["boss@w.example"])
    assert p.cc == ("bot@agents.example", "carol@y.example", "dave@z.example", "bot@agents.example", "eve@w.example")
    r = c.normalise_recipients(p.to, p.cc, p.bcc, AGENT, kind="reply")
    assert r.to == ("alice@x.example",)
    assert r.cc == ("carol@y.example", "dave@z.example", "eve@w.example")
    assert r.bcc == ("boss@w.example",)


def test_reply_without_reply_all_ignores_original_recipients():
    """Without reply_all only the request cc is used."""
    assert plan(extra_cc=["eve@w.example"]).cc == ("eve@w.example",)


def test_reply_all_tolerates_undisclosed_recipients_group():
    """An empty group (``undisclosed-recipients:;``) contributes no address and is no error."""
    raw = raw_message(From="a@x.example", To="undisclosed-recipients:;", Cc="c@x.example")
    assert plan(raw, reply_all=True).cc == ("c@x.example",)


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        (None, "no stored raw message"),
        (b"", "empty raw"),
        (raw_message(From="a@x.example", To="garbage without at"), "To unparseable"),
        (raw_message(From="a@x.example", To="ok@x.example", Cc="<<<"), "Cc unparseable"),
        (raw_message(From="a@x.example", To="jörg@x.example"), "non-ASCII address"),
    ],
)
def test_reply_all_unavailable_when_headers_unparseable(raw, why):
    """reply_all with headers that cannot be parsed → reply_all_unavailable."""
    raises("reply_all_unavailable", plan, raw, reply_all=True)


@pytest.mark.parametrize(
    ("subject", "expected"),
    [
        ("Question", "Re: Question"),
        ("", "Re: your message"),
        ("   ", "Re: your message"),
        ("Re: Question", "Re: Question"),
        ("RE: Question", "RE: Question"),
        ("re: question", "re: question"),
        ("rE: x", "rE: x"),
        ("Re:Question", "Re: Re:Question"),
        ("Re:  two spaces", "Re:  two spaces"),
        ("Re:\tTab", "Re: Re:\tTab"),
        ("Fwd: Re: x", "Re: Fwd: Re: x"),
        ("Réponse", "Re: Réponse"),
        ("Re", "Re: Re"),
        ("broken\r\nBcc: x", "Re: broken  Bcc: x"),
        ("x" * 998, "Re: " + "x" * 994),
    ],
)
def test_reply_subject_rule(subject, expected):
    """Re: prefix rule of api.md §5.3 (controls from foreign mail blanked, ≤ 998 chars)."""
    assert c.reply_subject(subject) == expected
    assert plan(original_subject=subject).subject == expected


@pytest.mark.parametrize(
    ("raw", "in_reply_to", "references"),
    [
        (ORIGINAL, "<orig-1@x.example>", "<root@x.example> <mid@x.example> <orig-1@x.example>"),
        (raw_message(From="a@x.example", Message_ID="<only@x.example>"), "<only@x.example>", "<only@x.example>"),
        (raw_message(From="a@x.example", Message_ID="  <sp@x.example>  (comment)"), "<sp@x.example>", "<sp@x.example>"),
        (raw_message(From="a@x.example", References="<r@x.example>"), "", "<r@x.example>"),
        (raw_message(From="a@x.example"), "", ""),
        (raw_message(From="a@x.example", Message_ID="no-brackets@x.example"), "", ""),
        (b"From: a@x.example\r\nMessage-ID:\r\n <folded@x.example>\r\nReferences: <a@x>\r\n\t<b@x>\r\n\r\n",
         "<folded@x.example>", "<a@x> <b@x> <folded@x.example>"),
        (None, "", ""),
    ],
)
def test_reply_threading_headers(raw, in_reply_to, references):
    """In-Reply-To = original Message-ID; References = original References + Message-ID."""
    p = plan(raw)
    assert (p.in_reply_to, p.references) == (in_reply_to, references)


@pytest.mark.parametrize(("given", "expected"), [(None, "conv-1"), ("", ""), ("new", "new")])
def test_reply_conversation_id_defaults_to_original(given, expected):
    """Absent conversation_id takes the original's; a given one (even empty) wins."""
    assert plan(conversation_id=given).conversation_id == expected


# ====================================================================== composition (§7.4)


def test_compose_headers_for_simple_message():
    """A plain ASCII message has exactly the §7.4 header fields, each once, with their values,
    and a 7bit text/plain; charset=utf-8 body."""
    raw = compose(cc=["c@x.example"], conversation_id="conv-1", in_reply_to="<o@x>", references="<r@x> <o@x>")
    h = unfolded(raw)
    names = [f.partition(":")[0] for f in re.split(r"\r\n(?![ \t])", header_block(raw))]
    assert len(names) == len(set(names)) == len(h)
    content_type = h.pop("Content-Type")
    assert h == {
        "From": '"Bot via e2a" <bot@agents.example>',
        "To": "a@x.example",
        "Cc": "c@x.example",
        "Reply-To": "bot@agents.example",
        "Subject": "Hello",
        "Date": "Mon, 27 Apr 2026 12:05:00 +0000",
        "Message-ID": "<msg_abababababababababababababababab@e2a.example>",
        "In-Reply-To": "<o@x>",
        "References": "<r@x> <o@x>",
        "X-E2A-Conversation-Id": "conv-1",
        "MIME-Version": "1.0",
        "Content-Transfer-Encoding": "7bit",
    }
    assert re.fullmatch(r'text/plain; charset=("?)utf-8\1', content_type)
    msg = parse(raw)
    assert msg.get_content_type() == "text/plain" and msg.get_content_charset() == "utf-8"
    assert raw.endswith(b"\r\n\r\nHi there\r\n") and raw.count(b"\r\n\r\n") == 1
    assert not msg.defects
    assert_crlf_only(raw)


def test_compose_deterministic_given_inputs():
    """Same inputs and boundary source → same bytes."""
    kw = dict(body_html="<b>x</b>", attachments=[Attachment("a.txt", "text/plain", b"abc")])
    assert compose(**kw) == compose(**kw)


def test_compose_omits_optional_headers_when_empty():
    """No Cc, In-Reply-To, References or conversation header when empty; never Bcc."""
    names = set(unfolded(compose(to=["a@x.example"], cc=[])))
    assert names == {"From", "To", "Reply-To", "Subject", "Date", "Message-ID", "MIME-Version", "Content-Type",
                     "Content-Transfer-Encoding"}


def test_compose_omits_to_when_cc_only():
    """To is omitted when empty (Cc-only message)."""
    h = unfolded(compose(to=[], cc=["c@x.example"]))
    assert "To" not in h and h["Cc"] == "c@x.example"


@pytest.mark.parametrize(
    ("name", "address", "header", "display"),
    [
        ("Bot", AGENT, '"Bot via e2a" <bot@agents.example>', "Bot via e2a"),
        ("", AGENT, '"bot@agents.example via e2a" <bot@agents.example>', "bot@agents.example via e2a"),
        ('The "Best" Bot', AGENT, '"The \\"Best\\" Bot via e2a" <bot@agents.example>', 'The "Best" Bot via e2a'),
        ("back\\slash", AGENT, '"back\\\\slash via e2a" <bot@agents.example>', "back\\slash via e2a"),
        ("Doe, John (CEO) <x@y>", AGENT, '"Doe, John (CEO) <x@y> via e2a" <bot@agents.example>',
         "Doe, John (CEO) <x@y> via e2a"),
        ("Zoë", AGENT, None, "Zoë via e2a"),
        ("日本語のエージェント" * 10, AGENT, None, "日本語のエージェント" * 10 + " via e2a"),
        ('Zoë "q"', AGENT, None, 'Zoë "q" via e2a'),
    ],
)
def test_compose_from_display_name(name, address, header, display):
    """From is the quoted (escaped) or RFC 2047 display name + " via e2a" and the agent address."""
    raw = compose(agent_name=name, agent_address=address)
    h = unfolded(raw)
    if header is not None:
        assert h["From"] == header
    else:
        assert re.match(r"=\?utf-8\?[bq]\?", h["From"], re.I)
        assert header_block(raw).isascii()
    # RFC 2047 decoding (email.header); CPython's headerregistry wrongly keeps the folding
    # space between adjacent encoded-words in a phrase, so it is not used for the name.
    raw_from = re.search(r"^From: (.*?)\r\n(?![ \t])", header_block(raw) + "\r\n", re.S | re.M).group(1)
    if header is None:
        phrase, _, addr_got = raw_from.replace("\r\n", "").rpartition(" <")
        assert (str(make_header(decode_header(phrase))), addr_got) == (display, address + ">")
    else:
        assert parseaddr(raw_from) == (display, address)
    assert parse(raw)["From"].addresses[0].addr_spec == address
    assert all(len(line) <= 78 for line in header_block(raw).split("\r\n") if not line.startswith("From: \""))


@pytest.mark.parametrize(
    ("subject", "encoded"),
    [
        ("Hello", False),
        ("Hello world " * 20, False),
        ("tab\there  and   spaces", False),
        ("Grüße aus Köln", True),
        ("日本語の件名" * 30, True),
        ("emoji 🎉 party", True),
        ("x" * 998, True),  # one word too long to fold
        ("a" * 70 + " " + "b" * 80, True),
        ("looks =?utf-8?q?encoded?= but is not", True),
        ("para\u2029graph\u2028line", True),  # str.splitlines() breaks: refused by the policy as str
        ("nel\x85 =?utf-8?q?x?=", True),
        ("", False),
    ],
)
def test_compose_subject_encoding_and_folding(subject, encoded):
    """ASCII subjects are folded at whitespace (< 78 octets a line); non-ASCII and unfoldable
    ones become RFC 2047 encoded-words; the parsed subject equals the input."""
    raw = compose(subject=subject)
    block = header_block(raw)
    subject_lines = re.search(r"^Subject:.*?(?=\r\n[^ \t])", block, re.S | re.M).group(0).split("\r\n")
    assert all(len(line) < 78 for line in subject_lines)
    raw_value = unfolded(raw)["Subject"]
    if encoded:
        assert raw_value != subject and re.search(r"=\?utf-8\?[bq]\?", raw_value, re.I)
    else:
        assert raw_value == subject.strip()
    assert parse(raw)["Subject"] == subject.strip()


@given(st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc")), max_size=300))
@settings(max_examples=150, deadline=None)
def test_compose_subject_round_trips(subject):
    """Any header-safe subject comes back from the parser (modulo trimming)."""
    raw = compose(subject=subject)
    assert_crlf_only(raw)
    assert all(len(line) < 78 for line in header_block(raw).split("\r\n") if line.startswith(("Subject", " =?")))
    got = str(parse(raw)["Subject"])
    assert got == subject.strip(" \t") or (got == "" and subject.strip(" \t") == "")


def test_compose_date_is_utc_plus_0000():
    """Date is RFC 5322 in UTC with +0000, whatever the input zone."""
    d = datetime(2026, 4, 27, 14, 5, 0, tzinfo=timezone(timedelta(hours=2)))
    assert unfolded(compose(date=d))["Date"] == "Mon, 27 Apr 2026 12:05:00 +0000"
    with pytest.raises(ValueError):
        compose(date=datetime(2026, 4, 27))


def test_compose_recipients_joined_and_folded():
    """To/Cc are joined by ", " and folded between addresses when long."""
    to = [f"user{i}@example{i}.example" for i in range(50)]
    raw = compose(to=to, cc=to[:3])
    assert unfolded(raw)["To"] == ", ".join(to)
    assert unfolded(raw)["Cc"] == ", ".join(to[:3])
    assert all(len(line) <= 78 for line in header_block(raw).split("\r\n"))
    assert [a.addr_spec for a in parse(raw)["To"].addresses] == to


def test_compose_references_folded_when_long():
    """A long References chain is folded between msg-ids and parses back intact."""
    refs = " ".join(f"<id{i}.{'x' * 20}@mail.example>" for i in range(40))
    raw = compose(in_reply_to="<id39.xxxxxxxxxxxxxxxxxxxx@mail.example>", references=refs)
    assert unfolded(raw)["References"] == refs
    assert all(len(line) <= 78 for line in header_block(raw).split("\r\n"))


INJECTION = "x\r\nBcc: evil@x.example"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"subject": INJECTION},
        {"agent_name": INJECTION},
        {"to": [INJECTION]},
        {"cc": ["c@x.example", INJECTION]},
        {"conversation_id": INJECTION},
        {"in_reply_to": "<a@x>\r\nBcc: evil@x.example"},
        {"references": "<a@x>\nBcc: evil@x.example"},
        {"in_reply_to": "not-a-msgid"},
        {"attachments": [Attachment(INJECTION, "text/plain", b"")]},
        {"attachments": [Attachment("f", "text/plain" + INJECTION, b"")]},
        {"agent_address": "bot@agents.example\r\nBcc: evil@x.example"},
        {"subject": "a\rb"},
        {"subject": "a\nb"},
        {"agent_name": "a\x00b"},
    ],
)
def test_compose_refuses_header_injection(kwargs):
    """CR/LF or controls in any header-bound argument → 400 invalid_header_value, no bytes."""
    raises("invalid_header_value", compose, **kwargs)


@pytest.mark.parametrize(
    ("text", "html", "attachments", "shape"),
    [
        ("t", "", [], ["text/plain"]),
        ("t", "<p>h</p>", [], ["multipart/alternative", "text/plain", "text/html"]),
        ("t", "", [Attachment("a.bin", "application/octet-stream", b"\x00\x01")],
         ["multipart/mixed", "text/plain", "application/octet-stream"]),
        ("t", "<p>h</p>", [Attachment("a.png", "image/png", b"png"), Attachment("b.txt", "text/plain", b"hi")],
         ["multipart/mixed", "multipart/alternative", "text/plain", "text/html", "image/png", "text/plain"]),
    ],
)
def test_compose_mime_shape(text, html, attachments, shape):
    """text/plain | multipart/alternative (text, HTML) | multipart/mixed (body first, then attachments)."""
    raw = compose(body_text=text, body_html=html, attachments=attachments)
    msg = parse(raw)
    assert [p.get_content_type() for p in msg.walk()] == shape
    for part in msg.walk():
        if part.is_multipart():
            assert re.fullmatch(r"e2a_[0-9a-f]{32}", part.get_boundary())
            assert part["Content-Transfer-Encoding"] is None
        elif part.get_content_maintype() == "text" and part.get_content_disposition() is None:
            assert part.get_content_charset() == "utf-8"
    assert not msg.defects and all(not p.defects for p in msg.walk())
    assert_crlf_only(raw)


def test_compose_boundaries_distinct_and_redrawn_when_in_content():
    """Nested boundaries differ; a boundary that appears in the content is drawn again."""
    clash = "--e2a_" + "0" * 32
    raw = compose(body_text=f"look: {clash}", body_html="<p>x</p>", attachments=[Attachment("a", "text/plain", b"")])
    boundaries = [p.get_boundary() for p in parse(raw).walk() if p.is_multipart()]
    assert len(set(boundaries)) == 2 and "e2a_" + "0" * 32 not in boundaries
    assert parse(raw).get_body(("plain",)).get_content() == f"look: {clash}\r\n"


@pytest.mark.parametrize(
    ("body", "cte"),
    [
        ("plain ascii", "7bit"),
        ("x" * 998, "7bit"),
        ("x" * 999, "quoted-printable"),
        ("short\n" + "y" * 1200 + "\nend", "quoted-printable"),
        ("café", "quoted-printable"),
        ("emoji 🎉", "quoted-printable"),
        ("nul\x00byte", "quoted-printable"),
        ("trailing space \nline", "7bit"),
        ("=3D looks encoded", "7bit"),
        (".\n..\n.leading dots", "7bit"),
        ("", "7bit"),
    ],
)
def test_compose_transfer_encoding(body, cte):
    """7bit for pure ASCII with lines ≤ 998 octets, else quoted-printable; content survives."""
    for kwargs, subtype in (({"body_text": body}, "plain"), ({"body_text": "t", "body_html": body or "x"}, "html")):
        raw = compose(**kwargs)
        part = parse(raw).get_body((subtype,))
        expected_body = (body or "x") if subtype == "html" else body
        want_cte = cte if expected_body == body else "7bit"
        assert part["Content-Transfer-Encoding"] == want_cte
        normal = re.sub(r"\r\n|\r|\n", "\r\n", expected_body)
        if not normal.endswith("\r\n"):
            normal += "\r\n"  # set_content writes an empty text as one empty line
        assert part.get_content() == normal
        assert_crlf_only(raw)
        if want_cte == "quoted-printable":
            payload = raw.split(b"quoted-printable\r\n\r\n", 1)[1].split(b"\r\n--e2a_")[0]
            assert all(len(line) <= 76 for line in payload.split(b"\r\n"))
            assert quopri.decodestring(payload) == normal.encode("utf-8")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a\nb", "a\r\nb\r\n"),
        ("a\rb", "a\r\nb\r\n"),
        ("a\r\nb", "a\r\nb\r\n"),
        ("a\n\rb", "a\r\n\r\nb\r\n"),
        ("a\r\r\nb\n", "a\r\n\r\nb\r\n"),
        ("\n\n", "\r\n\r\n"),
        ("a\u2028b", "a\u2028b\r\n"),
    ],
)
def test_compose_normalises_line_endings(text, expected):
    """LF, CR and CRLF in bodies become CRLF; other separators are content."""
    raw = compose(body_text=text, body_html=text)
    msg = parse(raw)
    assert msg.get_body(("plain",)).get_content() == expected
    assert msg.get_body(("html",)).get_content() == expected
    assert_crlf_only(raw)


@pytest.mark.parametrize(
    ("filename", "disposition_re"),
    [
        ("report.pdf", r'^attachment; filename="report\.pdf"$'),
        ('we"ird\\name.txt', r'^attachment; filename="we\\"ird\\\\name\.txt"$'),
        ("x" * 255, r'^attachment; filename="x{255}"$'),
        ("résumé.pdf", r"^attachment; filename\*=utf-8''r%C3%A9sum%C3%A9\.pdf$"),
        ("日本語のファイル名" * 20 + ".txt", r"^attachment; filename\*0\*=utf-8''%E6.*filename\*1\*="),
    ],
)
def test_compose_attachment_round_trip(filename, disposition_re):
    """Attachment parts: given type, Content-Disposition filename (RFC 2231 when non-ASCII),
    base64 in 76-character lines, bytes unchanged."""
    data = bytes(range(256)) * 5
    raw = compose(attachments=[Attachment(filename, "application/x-test; v=1", data)])
    head, _, payload = mime_parts(raw)[2].partition(b"\r\n\r\n")
    h = unfolded(head + b"\r\n\r\n")
    assert set(h) == {"Content-Type", "Content-Disposition", "Content-Transfer-Encoding"}
    assert re.search(disposition_re, h["Content-Disposition"])
    assert re.fullmatch(r'application/x-test; v=("?)1\1', h["Content-Type"])
    assert h["Content-Transfer-Encoding"] == "base64"
    part = list(parse(raw).iter_attachments())[0]
    assert part.get_filename() == filename
    assert part.get_content() == data
    assert (part.get_content_type(), part.get_param("v")) == ("application/x-test", "1")
    assert not part.defects
    assert payload.endswith(b"\r\n")  # the CRLF before the delimiter is the delimiter's (RFC 2046)
    lines = payload[:-2].split(b"\r\n")
    assert all(len(line) == 76 for line in lines[:-1]) and 0 < len(lines[-1]) <= 76
    assert all(len(line) <= 78 for line in header_block(raw).split("\r\n"))
    assert all(len(line) <= 998 for line in raw.split(b"\r\n"))


HEADER_TEXT = st.characters(blacklist_categories=("Cs", "Cc"))


@given(name=st.text(alphabet=HEADER_TEXT, max_size=200) | st.sampled_from(["=?utf-8?q?x?=", "Zoë =?x?b?eA==?= ,;<>", "a\u2028b\x85c", "é" * 200]))
@settings(max_examples=150, deadline=None)
def test_compose_from_round_trips_any_name(name):
    """Any header-safe agent name gives a From that decodes to "<name> via e2a" and the agent
    address: a quoted-string on one line when ASCII, else RFC 2047 folded under 78 octets."""
    raw = compose(agent_name=name)
    display = f"{name or AGENT} via e2a"
    block = header_block(raw)
    assert block.isascii()
    value = unfolded(raw)["From"]
    phrase, _, addr = value.rpartition(" <")
    assert addr == AGENT + ">"
    if display.isascii() and "=?" not in display:
        assert parseaddr(value) == (display, AGENT)
        assert phrase.startswith('"') and phrase.endswith('"')
    else:
        assert str(make_header(decode_header(phrase))) == display
        from_lines = re.search(r"^From:.*?(?=\r\n[^ \t])", block, re.S | re.M).group(0).split("\r\n")
        assert all(len(line) < 78 for line in from_lines)
    msg = parse(raw)
    assert msg["From"].addresses[0].addr_spec == AGENT
    assert not msg.defects
    assert_crlf_only(raw)


@given(st.text(alphabet=HEADER_TEXT, min_size=1, max_size=255) | st.sampled_from(["=?utf-8?q?x?=.txt", "a=?b"]))
@settings(max_examples=150, deadline=None)
def test_compose_attachment_filename_round_trips(filename):
    """Any valid filename reads back unchanged without defects: filename="…" for ASCII names,
    RFC 2231 filename*= for non-ASCII ones (and for ASCII ones a reader would take for RFC 2047)."""
    raw = compose(attachments=[Attachment(filename, "application/pdf", b"%PDF")])
    head = mime_parts(raw)[2].partition(b"\r\n\r\n")[0]
    disposition = unfolded(head + b"\r\n\r\n")["Content-Disposition"]
    if filename.isascii() and "=?" not in filename:
        assert disposition == "attachment; filename=" + c._quote_display(filename)
    else:
        assert disposition.startswith("attachment;") and "filename*" in disposition
    part = list(parse(raw).iter_attachments())[0]
    assert part["Content-Disposition"].params["filename"] == filename  # get_filename() strips
    assert not part.defects and not part["Content-Disposition"].defects
    assert all(len(line) <= 998 for line in raw.split(b"\r\n"))
    assert_crlf_only(raw)


def test_compose_parts_carry_only_content_headers():
    """MIME-Version appears once, at the top; body parts carry only their Content-* fields."""
    raw = compose(body_html="<p>h</p>", attachments=[Attachment("a.txt", "text/plain", b"x")])
    top, *parts = mime_parts(raw)
    assert header_block(top + b"\r\n\r\n").count("MIME-Version: 1.0") == 1
    for part in filter(None, parts):  # skip the empty preamble/epilogue pieces
        names = set(unfolded(part.partition(b"\r\n\r\n")[0] + b"\r\n\r\n"))
        assert names and all(n.startswith("Content-") for n in names), names
    assert [p.get_content_type() for p in parse(raw).walk()] == [
        "multipart/mixed", "multipart/alternative", "text/plain", "text/html", "text/plain"]


@pytest.mark.parametrize(
    ("kwargs", "field", "value"),
    [
        ({"conversation_id": "=?utf-8?q?x?="}, "X-E2A-Conversation-Id", "=?utf-8?q?x?="),
        ({"conversation_id": "a  b " + "c" * 100}, "X-E2A-Conversation-Id", "a  b " + "c" * 100),
        ({"in_reply_to": "<" + "x" * 90 + "@y>"}, "In-Reply-To", "<" + "x" * 90 + "@y>"),
        ({"references": "<=?utf-8?q?a?=@x> <" + "r" * 80 + "@x>"}, "References",
         "<=?utf-8?q?a?=@x> <" + "r" * 80 + "@x>"),
        ({"mail_domain": "m" * 60 + ".example"}, "Message-ID", f"<{MSG_ID}@{'m' * 60}.example>"),
        ({"to": ["a@x.example", "=?utf-8?q?x?=@x.example"]}, "To", "a@x.example, =?utf-8?q?x?=@x.example"),
        ({"cc": ['"a b"@x.example', "c@x.example"]}, "Cc", '"a b"@x.example, c@x.example'),
    ],
)
def test_compose_writes_ids_verbatim(kwargs, field, value):
    """Message-ID, In-Reply-To, References, the conversation id and recipient lists reach the
    wire unchanged (unfolding restores them; nothing is RFC 2047-encoded or decoded)."""
    raw = compose(**kwargs)
    assert unfolded(raw)[field] == value
    assert not parse(raw).defects
    assert_crlf_only(raw)


def test_compose_boundaries_distinct_when_source_repeats():
    """A constant random_hex still gives nested multiparts distinct e2a_ boundaries, the same
    ones every time."""
    kw = dict(body_html="<p>h</p>", attachments=[Attachment("a", "text/plain", b"")], random_hex=lambda: "f" * 32)
    raw = compose(**kw)
    boundaries = [p.get_boundary() for p in parse(raw).walk() if p.is_multipart()]
    assert len(set(boundaries)) == 2 and f"e2a_{'f' * 32}" in boundaries
    assert all(re.fullmatch(r"e2a_[0-9a-f]{32}", b) for b in boundaries)
    assert compose(**kw) == raw


def test_compose_empty_attachment():
    """A zero-byte attachment has an empty part body and round-trips."""
    part = list(parse(compose(attachments=[Attachment("e", "text/plain", b"")])).iter_attachments())[0]
    assert part.get_content() in ("", b"")


def test_compose_test_email_variant():
    """Test email: From "e2a" <noreply@M>, To the agent, fixed subject, body naming the agent."""
    raw = compose(test_email=True, agent_name="Zoë", subject="ignored", to=["x@y.example"],
                  attachments=[Attachment("a", "text/plain", b"")], conversation_id="ignored")
    h = unfolded(raw)
    assert h["From"] == '"e2a" <noreply@e2a.example>'
    assert h["To"] == AGENT
    assert h["Subject"] == "Test email from e2a"
    assert "Reply-To" not in h and "X-E2A-Conversation-Id" not in h
    body = parse(raw).get_content()
    assert AGENT in body and "Zoë" in body
    assert parse(raw).get_content_type() == "text/plain"


@given(
    text=st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=3000),
    html=st.one_of(st.just(""), st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=500)),
    with_attachment=st.booleans(),
)
@settings(max_examples=150, deadline=None)
def test_compose_then_stuff_is_safe_for_any_body(text, html, with_attachment):
    """For any body: no bare CR/LF, no early end of DATA, and un-stuffing gives the message back."""
    attachments = [Attachment("a.bin", "application/octet-stream", text.encode("utf-8"))] if with_attachment else []
    raw = compose(body_text=text, body_html=html, attachments=attachments)
    assert_crlf_only(raw)
    data = c.smtp_data_bytes(raw)
    assert_crlf_only(data)
    assert data.endswith(b"\r\n.\r\n")
    assert b"\r\n.\r\n" not in data[:-3]
    assert not data.startswith(b".\r\n")
    assert unstuff(data) == raw
    msg = parse(raw)
    plain = msg.get_body(("plain",)).get_content()
    want = re.sub(r"\r\n|\r|\n", "\r\n", text)
    assert plain == (want if want.endswith("\r\n") else want + "\r\n")


# ====================================================================== DATA (§7.6)


@pytest.mark.parametrize(
    ("message", "data"),
    [
        (b"a\r\nb\r\n", b"a\r\nb\r\n.\r\n"),
        (b"a\r\nb", b"a\r\nb\r\n.\r\n"),
        (b".a\r\n", b"..a\r\n.\r\n"),
        (b"a\r\n.\r\nb\r\n", b"a\r\n..\r\nb\r\n.\r\n"),
        (b"a\r\n..b\r\n", b"a\r\n...b\r\n.\r\n"),
        (b"a\r\n.", b"a\r\n..\r\n.\r\n"),
        (b"a\n.\nb", b"a\r\n..\r\nb\r\n.\r\n"),
        (b"a\r.\rb\r", b"a\r\n..\r\nb\r\n.\r\n"),
        (b"a\r\r\n.b\n\r", b"a\r\n\r\n..b\r\n\r\n.\r\n"),
        (b"a.b\r\n a.\r\n", b"a.b\r\n a.\r\n.\r\n"),
        (b"", b".\r\n"),
        (b"\r\n", b"\r\n.\r\n"),
        (b".", b"..\r\n.\r\n"),
    ],
)
def test_smtp_data_bytes_table(message, data):
    """CRLF-normalised once, every '.'-initial line stuffed, terminated once."""
    assert c.smtp_data_bytes(message) == data


@pytest.mark.parametrize("boundary", [16384, 16385, 16383, 32768, 8192, 65536])
@pytest.mark.parametrize("newline", [b"\r\n", b"\n", b"\r"])
def test_smtp_data_bytes_stuffs_dot_lines_at_chunk_boundaries(boundary, newline):
    """A '.' line that starts exactly at (or next to) a 16 KiB offset is still stuffed."""
    filler = b"x" * (boundary - len(newline))
    message = filler + newline + b"." + newline + b".tail" + newline + b"end"
    data = c.smtp_data_bytes(message)
    assert b"\r\n..\r\n..tail\r\nend\r\n.\r\n" in data
    assert b"\r\n.\r\n" not in data[:-3]
    assert_crlf_only(data)
    assert unstuff(data) == re.sub(rb"\r\n|\r|\n", b"\r\n", message) + b"\r\n"


@given(st.binary(max_size=2000))
@settings(max_examples=200, deadline=None)
def test_smtp_data_bytes_properties(message):
    """Arbitrary bytes: no bare CR/LF, one terminator at the end, reversible after normalising."""
    data = c.smtp_data_bytes(message)
    assert_crlf_only(data)
    assert data.endswith(b".\r\n")
    assert b"\r\n.\r\n" not in data[:-3]
    normal = re.sub(rb"\r\n|\r|\n", b"\r\n", message)
    if normal and not normal.endswith(b"\r\n"):
        normal += b"\r\n"
    assert unstuff(data) == normal
