"""twistd plugin for e2a. Imports nothing from e2a so plugin discovery stays cheap and never
installs a reactor early (importing twisted.mail.smtp would)."""

from twisted.application.service import ServiceMaker

e2a = ServiceMaker(
    "e2a",
    "e2a.tap",
    "Authenticated email gateway for AI agents (SMTP in, signed webhooks/WebSockets out).",
    "e2a",
)
