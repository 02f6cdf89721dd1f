"""The CLI's saved settings: ``~/.e2a/config.json``, mode 0600 (it holds an API key)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from e2a.v1.api import DEFAULT_URL, config_path, saved_config

KEYS = ("url", "api_key", "agent_email", "shared_domain")


def load() -> dict[str, Any]:
    return saved_config()


def save(data: dict[str, Any]) -> Path:
    """Write atomically; the file is created 0600 before any byte of the key is written."""
    path = config_path()
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    if path.parent == Path.home() / ".e2a":
        os.chmod(path.parent, 0o700)  # ours: also when it existed (an older CLI made it 0755)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, (json.dumps({k: data[k] for k in KEYS if data.get(k) is not None}, indent=2) + "\n").encode())
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return path


def mask_key(key: str | None) -> str:
    """Only the display prefix of a key ever reaches the terminal."""
    return f"{key[:12]}…" if key else ""


@dataclass
class Settings:
    url: str
    api_key: str | None
    agent_email: str | None
    shared_domain: str

    @classmethod
    def resolve(cls, agent: str | None = None) -> Settings:
        saved = load()
        return cls(
            url=str(os.environ.get("E2A_URL") or saved.get("url") or DEFAULT_URL).rstrip("/"),
            api_key=str(os.environ.get("E2A_API_KEY") or saved.get("api_key") or "").strip() or None,
            agent_email=agent or os.environ.get("E2A_AGENT_EMAIL") or saved.get("agent_email") or None,
            shared_domain=str(saved.get("shared_domain") or ""),
        )
