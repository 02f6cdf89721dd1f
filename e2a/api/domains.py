"""Routes: domains (placeholder until implemented)."""

from __future__ import annotations

from typing import Any

from klein import Klein


def install(router: Klein, deps: Any) -> None:
    return None
