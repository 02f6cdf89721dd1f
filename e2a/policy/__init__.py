"""Neutral rules shared by the API, delivery and outbound layers (pure, no I/O of their own).

Why a package of its own: delivery and outbound must never import the HTTP API (e2a.api), yet
they need the same answers to "who is this caller" (:mod:`~e2a.policy.principal`), "may e2a
reach this webhook URL" (:mod:`~e2a.policy.ssrf`, the SSRF check) and "when is the next
attempt" (:mod:`~e2a.policy.backoff`, the retry schedule). Living here, each rule has one home
that every layer imports downwards.
"""
