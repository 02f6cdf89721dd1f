"""Domain names → lowercase IDNA A-labels (api.md §0.11), the one rule for every layer (pure).

The API's domain and address fields, the SMTP recipient's agent key and outbound recipients all
read a domain through :func:`domain_problem`, so a U-label and its A-label always name the same
agent and the same domain row.
"""

from __future__ import annotations

import re

import idna

from e2a.mailsyntax.text import has_control_chars

__all__ = ["MAX_DOMAIN_OCTETS", "MAX_LABELS", "MIN_LABELS", "a_label", "domain_problem", "is_domain_name"]

MAX_DOMAIN_OCTETS = 253
MIN_LABELS = 2
MAX_LABELS = 127

LDH_LABEL_RE = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
_ANY_CASE_LDH_LABEL_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
# What UTS 46 with STD3 rules leaves unchanged in an ASCII name once lowercased: such a name
# needs no mapping call (the common case, on every RCPT TO).
_PLAIN_ASCII_RE = re.compile(r"^[a-z0-9.-]*$")


def domain_problem(raw: str) -> tuple[str | None, str]:
    """(normalised domain, "") or (None, reason)."""
    if not raw:
        return None, "domain is empty"
    if has_control_chars(raw) or any(c.isspace() for c in raw):
        return None, "domain contains whitespace or control characters"
    lowered = raw.lower() if raw.isascii() else ""
    if lowered and _PLAIN_ASCII_RE.fullmatch(lowered):
        mapped = lowered  # exactly what the mapping below returns for such a name
    else:
        try:
            mapped = idna.uts46_remap(raw, std3_rules=True, transitional=False)
        except (idna.IDNAError, UnicodeError) as exc:
            return None, f"domain is not a valid name ({exc})"
    if mapped.endswith("."):
        mapped = mapped[:-1]
    labels = mapped.split(".")
    if not MIN_LABELS <= len(labels) <= MAX_LABELS:
        return None, f"domain must have {MIN_LABELS} to {MAX_LABELS} labels"
    out = []
    for label in labels:
        if not label:
            return None, "domain has an empty label"
        try:
            alabel = label if label.isascii() else idna.alabel(label).decode("ascii")
            if alabel.startswith("xn--"):
                idna.decode(alabel)  # a broken punycode label is not a name
        except (idna.IDNAError, UnicodeError) as exc:
            return None, f"domain label is not valid IDNA ({exc})"
        if not LDH_LABEL_RE.fullmatch(alabel):
            return None, "domain labels are 1-63 of a-z, 0-9 and '-', not starting or ending with '-'"
        out.append(alabel)
    name = ".".join(out)
    if len(name) > MAX_DOMAIN_OCTETS:
        return None, f"domain is longer than {MAX_DOMAIN_OCTETS} octets"
    return name, ""


def a_label(raw: str) -> str | None:
    """``raw`` as a normalised domain name (lowercase A-labels, one trailing dot dropped), or
    None when it cannot be a domain name at all."""
    name, _problem = domain_problem(raw)
    return name


def is_domain_name(domain: str) -> bool:
    """LDH labels of 1–63 octets (either case), at most 253 octets in all (RFC 1035/5321 host
    names), as found in a header; no IDNA mapping (see :func:`domain_problem` for that)."""
    if not domain or len(domain) > MAX_DOMAIN_OCTETS:
        return False
    return all(_ANY_CASE_LDH_LABEL_RE.fullmatch(label) for label in domain.split("."))
