"""What the relay needs to know of the configuration (:class:`RouteConfig`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from e2a.config import Config, OutboundConfig, OutboundSmtpConfig


@dataclass(frozen=True)
class RouteConfig:
    """What the relay needs to know: the ``outbound_smtp`` and ``outbound`` sections, the EHLO
    name and whether non-public MX addresses are skipped (production)."""

    outbound_smtp: OutboundSmtpConfig = field(default_factory=OutboundSmtpConfig)
    outbound: OutboundConfig = field(default_factory=OutboundConfig)
    helo_name: str = "localhost"
    production: bool = False

    @classmethod
    def from_config(cls, config: Config) -> RouteConfig:
        return cls(config.outbound_smtp, config.outbound, config.helo_name, config.production)

    @property
    def uses_upstream(self) -> bool:
        return bool(self.outbound_smtp.host)
