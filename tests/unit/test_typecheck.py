"""mypy over e2a/ at the level configured in setup.cfg ``[mypy]``: the type check in CI.

It runs as a test so the README's one test command covers it. The cache lives in the system
temporary directory (not the run's own, which goes at the end: tests/support/dirs.py), per user
and per checkout, so a second run only re-checks changed modules.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.dirs import system_tmpdir

REPO = Path(__file__).resolve().parents[2]


def _cache_dir() -> Path:
    tag = hashlib.sha256(str(REPO).encode()).hexdigest()[:12]
    return Path(system_tmpdir()) / f"e2a-mypy-{os.getuid()}-{tag}"


@pytest.mark.timeout(600)
def test_mypy_passes_on_the_package() -> None:
    """``mypy e2a`` with setup.cfg's settings exits 0 (a new type error fails CI)."""
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", "setup.cfg", "--cache-dir", str(_cache_dir()), "e2a"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
