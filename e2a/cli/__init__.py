"""The ``e2a`` command-line tool (client side only: built on :mod:`e2a.v1`, no server imports)."""
