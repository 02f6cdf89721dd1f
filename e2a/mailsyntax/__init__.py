"""Mail syntax, one home (pure): header sections, addresses, domains and the agent key.

Used by smtp, api, mailauth and outbound alike, so none of them imports another layer for an
address rule:

* :mod:`e2a.mailsyntax.headers` — the top-level header section of a raw message, parsed once;
* :mod:`e2a.mailsyntax.domains` — domain names → lowercase IDNA A-labels (UTS 46), LDH checks;
* :mod:`e2a.mailsyntax.addresses` — recipient and agent address rules, header-bound text, and
  :func:`~e2a.mailsyntax.addresses.agent_key`, the ONE key an address is matched to an agent by
  (SMTP RCPT TO and the API's ``{email}`` paths both use it, so they cannot drift).
"""
