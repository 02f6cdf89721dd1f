"""e2a: an authenticated email gateway for AI agents, on Twisted and PostgreSQL."""

__version__ = "0.1.0"
