"""Client-side rules of the SDK and the CLI that need no server: settings fallbacks, bad keys and
URLs refused before any request, the config file's permissions, the verification gate's list."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from e2a.cli import config as cli_config
from e2a.cli.main import main
from e2a.v1 import E2AClient, UnverifiedEmailError
from e2a.v1.api import DEFAULT_URL, resolve_api_key, resolve_base_url
from e2a.v1.verify import parse_ts_sec

VECTORS = Path(__file__).parent.parent / "vectors"
STD = json.loads((VECTORS / "standard-webhooks.json").read_text())
KEY = "e2a_" + "1" * 64
CLOSED = "http://127.0.0.1:9"  # nothing listens there; no test below gets as far as connecting

# cli-sdk.md §3: readable only after verification
GATED = (
    "message_id", "conversation_id", "sender", "recipient", "to", "cc", "subject", "text_body", "html_body",
    "attachments", "received_at",
)


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    for name in ("E2A_API_KEY", "E2A_URL", "E2A_AGENT_EMAIL", "E2A_WEBHOOK_SECRET", "E2A_HMAC_SECRET"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("E2A_CLI_CONFIG", str(tmp_path / ".e2a" / "config.json"))
    return tmp_path


def test_base_url_falls_back_env_then_saved_config_then_default(clean_env, monkeypatch):
    """base_url: argument, then E2A_URL, then the CLI's saved url, then http://localhost:8080."""
    assert resolve_base_url(None) == DEFAULT_URL
    cli_config.save({"url": "http://saved.test:8080"})
    assert resolve_base_url(None) == "http://saved.test:8080"
    monkeypatch.setenv("E2A_URL", "https://env.test/")
    assert resolve_base_url(None) == "https://env.test"
    assert resolve_base_url("http://arg.test") == "http://arg.test"


def test_agent_email_falls_back_to_environment(clean_env, monkeypatch):
    """agent_email: argument, else E2A_AGENT_EMAIL; api_key from E2A_API_KEY."""
    monkeypatch.setenv("E2A_API_KEY", KEY)
    monkeypatch.setenv("E2A_AGENT_EMAIL", "bot@agents.test")
    with E2AClient(base_url=CLOSED) as client:
        assert client.agent_email == "bot@agents.test" and client.api.api_key == KEY
    with E2AClient(base_url=CLOSED, agent_email="other@agents.test") as client:
        assert client.agent_email == "other@agents.test"


def test_api_key_surrounding_whitespace_stripped_control_characters_refused_without_echo():
    """A key pasted with a line break still works; one with a control character inside is a
    ValueError that does not repeat the key (httpx would print it whole in its header error)."""
    assert resolve_api_key(KEY + "\r\n") == KEY
    assert resolve_api_key("  " + KEY + "\t") == KEY
    for bad in (KEY[:20] + "\r" + KEY[20:], KEY[:20] + "ä" + KEY[20:], KEY[:20] + " " + KEY[20:]):
        with pytest.raises(ValueError) as info:
            resolve_api_key(bad)
        assert KEY[4:20] not in str(info.value)


@pytest.mark.parametrize("url", ["http://[::1", "http://x.test:port", "localhost:8080", "ftp://x.test", "http://"])
def test_invalid_base_url_is_value_error(url):
    """A URL httpx cannot use is refused at construction with a clear ValueError."""
    with pytest.raises(ValueError, match="URL"):
        resolve_base_url(url)


def test_cli_bad_key_exits_2_without_printing_it(clean_env, monkeypatch, capsys):
    """`e2a inbox` with a key holding a control character: exit 2, one line, the key not shown."""
    bad = KEY[:30] + "\x01" + KEY[30:]
    monkeypatch.setenv("E2A_API_KEY", bad)
    monkeypatch.setenv("E2A_URL", CLOSED)
    monkeypatch.setenv("E2A_AGENT_EMAIL", "bot@agents.test")
    assert main(["inbox"]) == 2
    out, err = capsys.readouterr()
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert KEY[4:30] not in out + err


@pytest.mark.parametrize("command", [["inbox"], ["login", "--key", KEY], ["doctor", "--json"]])
def test_cli_invalid_url_one_line_no_traceback(clean_env, monkeypatch, capsys, command):
    """An unusable URL (E2A_URL or --url) is bad input: one error line, exit 2 (doctor: a ✗ check)."""
    monkeypatch.setenv("E2A_URL", "http://[::1")
    monkeypatch.setenv("E2A_API_KEY", KEY)
    monkeypatch.setenv("E2A_AGENT_EMAIL", "bot@agents.test")
    code = main(command)
    out, err = capsys.readouterr()
    if command[0] == "doctor":
        report = json.loads(out)
        assert code == 3 and report["checks"][0]["ok"] is False and report["checks"][0]["fix"]
    else:
        assert code == 2 and err.startswith("error: invalid_input: ") and len(err.strip().splitlines()) == 1


def test_cli_config_file_0600_and_directory_0700_even_if_it_existed(clean_env):
    """save() leaves config.json 0600 and tightens an existing ~/.e2a to 0700 (it holds the key)."""
    home_dir = clean_env / ".e2a"
    home_dir.mkdir(mode=0o755)
    os.chmod(home_dir, 0o755)
    path = cli_config.save({"api_key": KEY})
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(home_dir).st_mode) == 0o700


def test_parse_gates_every_contract_field_and_to_dict(clean_env):
    """Every field of the contract's list (and the payload dump) raises until verified."""
    client = E2AClient(api_key=KEY, base_url=CLOSED)
    email = client.parse(STD["body"])
    for name in GATED:
        with pytest.raises(UnverifiedEmailError):
            getattr(email, name)
    with pytest.raises(UnverifiedEmailError):
        email.to_dict()
    assert email.raw_message and email.auth.message_id and isinstance(email.verified, bool)
    email.check_signature(STD["secret"], now=parse_ts_sec("2026-04-27T12:01:00Z"))
    for name in GATED:
        getattr(email, name)
    assert email.to_dict()["message_id"] == email.message_id
