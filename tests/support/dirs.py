"""Temporary directories of a test run.

Run as root (CI, containers), the embedded server runs as the system user ``e2a-postgres``,
which must be able to reach the data directory; e2a never changes the mode of anything outside
the data directory, so the test makes its own temporary parent searchable (``mkdtemp`` creates
it 0700).

A run keeps every temporary file under one directory of its own and removes it at the end
(:func:`start_run_tmp`, :func:`end_run_tmp`, called by tests/conftest.py).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

#: Set (to anything but "" or "0") to keep the run's temporary directory for a post-mortem.
KEEP_TMP_ENV = "E2A_KEEP_TEST_TMP"

# The run's directory and what tempfile and TMPDIR were before it (restored at the end, for a
# pytest run inside a longer-lived process).
_run: dict[str, str | None] = {}


def reachable_tmpdir(prefix: str) -> Path:
    """A fresh temporary directory, mode 0755 (searchable by the embedded server's user)."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o755)
    return path


def system_tmpdir() -> str:
    """The temporary directory as it was before the run pointed ``tempfile`` at its own: for
    what is meant to outlive a run (the type checker's cache)."""
    return _run.get("tempdir_before") or tempfile.gettempdir()


def start_run_tmp() -> None:
    """Point ``tempfile`` and, through ``TMPDIR``, every process the tests start at a new
    directory of this run.

    WHY: the suite starts PostgreSQL servers, twistd processes and pip builds, each in a fresh
    temporary directory (about 700 MB a run in all), and left to each test, those directories
    outlived the run: repeated runs filled the disk. One directory lets the run clean up after
    all of them at once, whatever a test did or however it failed. It is mode 0755 so that the
    embedded PostgreSQL's own user can reach data directories under it (run as root). A
    pytest-xdist worker keeps the directory its controller made (inherited through TMPDIR).
    """
    if "root" in _run:
        return
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # the controller's directory, made in the one it found: that one outlives the run
        _run["tempdir_before"] = str(Path(tempfile.gettempdir()).parent)
        return
    before = tempfile.gettempdir()
    root = tempfile.mkdtemp(prefix="e2a-tests-", dir=before)
    os.chmod(root, 0o755)
    _run.update(root=root, tempdir=tempfile.tempdir, tempdir_before=before, TMPDIR=os.environ.get("TMPDIR"))
    tempfile.tempdir = root
    os.environ["TMPDIR"] = root


def end_run_tmp() -> None:
    """Remove the run's directory (keep it with ``E2A_KEEP_TEST_TMP=1``) and restore ``tempfile``
    and ``TMPDIR``."""
    if "root" not in _run:
        return
    root = _run.pop("root")
    assert root is not None
    tempfile.tempdir = _run.pop("tempdir")
    previous = _run.pop("TMPDIR")
    _run.clear()
    if previous is None:
        os.environ.pop("TMPDIR", None)
    else:
        os.environ["TMPDIR"] = previous
    if os.environ.get(KEEP_TMP_ENV, "") not in ("", "0"):
        sys.stderr.write(f"e2a tests: temporary files kept in {root}\n")
        return
    shutil.rmtree(root, ignore_errors=True)
    if os.path.exists(root):
        sys.stderr.write(f"e2a tests: could not remove all of {root} (a process still writing there?)\n")
