"""Mail syntax rules (e2a.mailsyntax): the one agent key, domains → A-labels, header sections."""

from __future__ import annotations

import re
from collections.abc import Coroutine
from typing import Any, TypeVar

import pytest

from e2a.api import wire
from e2a.errors import NotFound
from e2a.mailsyntax import addresses, domains, headers
from e2a.smtp.recipients import AgentRecipients
from e2a.store import agents as agent_store

T = TypeVar("T")


@pytest.mark.parametrize(
    ("address", "key"),
    [
        ("bot@agents.test", "bot@agents.test"),
        ("Bot@Agents.TEST", "bot@agents.test"),
        ("bot@agents.test.", "bot@agents.test"),  # one trailing dot dropped
        ("bot@bücher.example", "bot@xn--bcher-kva.example"),  # U-label → A-label
        ("bot@BÜCHER.example", "bot@xn--bcher-kva.example"),
        ("bot@xn--bcher-kva.example", "bot@xn--bcher-kva.example"),
        ("bot@ｅｘａｍｐｌｅ.com", "bot@example.com"),  # UTS 46 maps full-width letters
        ('"odd@local"@agents.test', '"odd@local"@agents.test'),  # the last @ splits
        ("bot", None),
        ("@agents.test", None),
        ("bot@", None),
        ("bot@localhost", None),  # one label is no agent domain
        ("bot@under_score.test", None),
        ("bot@-lead.test", None),
        ("bot@xn--broken-.test", None),
        ("bot@exa mple.test", None),
    ],
)
def test_agent_key_table(address: str, key: str | None) -> None:
    """agent_key lowercases, maps the domain to A-labels and refuses what no agent can be."""
    assert addresses.agent_key(address) == key


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ("bot@Agents.Test", "bot@agents.test"),
        ("bot@bücher.example", "bot@xn--bcher-kva.example"),
        ("Not An Address", "not an address"),  # compared as given: finds nothing
        ("bot@under_score.TEST", "bot@under_score.test"),
        ("bot\x00@agents.test", None),
        ("bot\r\n@agents.test", None),
        ("bot\ud800@agents.test", None),
    ],
)
def test_lookup_key_table(raw: str, key: str | None) -> None:
    """lookup_key is agent_key, the raw text lowercased when unparsable, None for controls."""
    assert addresses.lookup_key(raw) == key


@pytest.mark.parametrize(
    "raw",
    ["bot@agents.test", "Bot@Agents.Test.", "bot@bücher.example", "x@ｅｘａｍｐｌｅ.com", "bot@localhost", "bot"],
)
def test_api_path_and_smtp_rcpt_use_the_same_key_when_parsable(raw: str) -> None:
    """The API's {email} path and SMTP RCPT TO look up the same key (they used to drift)."""
    smtp_key = addresses.agent_key(raw)
    if smtp_key is not None:
        assert wire.path_agent_key(raw) == smtp_key


def test_api_path_key_of_control_characters_is_not_found() -> None:
    """A path address with a NUL answers agent_not_found before any lookup."""
    with pytest.raises(NotFound):
        wire.path_agent_key("bot\x00@agents.test")


@pytest.mark.parametrize(
    "raw",
    ["a.b", "Example.COM", "example.com.", "a-b.c-d.test", "under_score.test", "a..b", "-a.b", "a.b-",
     "x" * 64 + ".test", "xn--bcher-kva.example", "xn--zz.test", "a/b.test", "a.b..", "A_B.C", "a b.test"],
)
def test_domain_problem_ascii_fast_path_matches_uts46(raw: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Skipping the UTS 46 mapping for plain ASCII names gives exactly the mapped result."""
    fast = domains.domain_problem(raw)
    monkeypatch.setattr(domains, "_PLAIN_ASCII_RE", re.compile(r"(?!)"))  # always map
    assert domains.domain_problem(raw) == fast


@pytest.mark.parametrize(
    ("domain", "ok"),
    [("example.com", True), ("Example.COM", True), ("a", True), ("-a.com", False), ("a_b.com", False),
     ("", False), ("a." * 127 + "a", False)],
)
def test_is_domain_name_table(domain: str, ok: bool) -> None:
    """Header domains: LDH labels in either case, at most 253 octets."""
    assert domains.is_domain_name(domain) is ok


def test_header_section_is_reexported_from_authheaders() -> None:
    """mailauth.authheaders keeps its names: they are the mailsyntax parser itself."""
    from e2a.mailauth import authheaders

    assert authheaders.split_header_section is headers.split_header_section
    fields, offset = headers.split_header_section(b"A: 1\r\n b\r\nB: 2\r\n\r\nbody")
    assert [f.name for f in fields] == [b"A", b"B"]
    assert offset == len(b"A: 1\r\n b\r\nB: 2\r\n\r\n")


def test_smtp_recipients_use_agent_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """The RCPT lookup asks the store with agent_key's key, and nothing for unusable addresses."""
    seen: list[str] = []

    async def fake_find(db: object, key: str) -> str | None:
        seen.append(key)
        return "Bot@xn--bcher-kva.example"

    monkeypatch.setattr(agent_store, "find_receiving_agent", fake_find)
    lookup = AgentRecipients(object())  # type: ignore[arg-type]
    assert _run(lookup("Bot@Bücher.Example")) == "Bot@xn--bcher-kva.example"
    assert _run(lookup("nobody")) is None
    assert seen == ["bot@xn--bcher-kva.example"]


def _run(coro: Coroutine[Any, Any, T]) -> T:
    """Drive a coroutine that never waits (its awaits complete at once)."""
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]
    raise AssertionError("the coroutine waited")
