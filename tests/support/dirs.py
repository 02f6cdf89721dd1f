"""Temporary directories that may hold an e2a data directory with the embedded PostgreSQL.

Run as root (CI, containers), the embedded server runs as the system user ``e2a-postgres``,
which must be able to reach the data directory; e2a never changes the mode of anything outside
the data directory, so the test makes its own temporary parent searchable (``mkdtemp`` creates
it 0700).
"""

from __future__ import annotations

import tempfile
from pathlib import Path


def reachable_tmpdir(prefix: str) -> Path:
    """A fresh temporary directory, mode 0755 (searchable by the embedded server's user)."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o755)
    return path
