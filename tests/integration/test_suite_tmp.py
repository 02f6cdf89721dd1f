"""The test suite cleans up after itself (tests/conftest.py ``pytest_configure``).

A run starts PostgreSQL servers, twistd processes and builds in temporary directories; left
behind, they filled the disk of a machine that ran the suite often. These tests run a small
suite in a child pytest whose system temporary directory is a fresh, empty one, and look at
what is left there.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.support.apiserver import make_test_config
from tests.support.dirs import reachable_tmpdir, system_tmpdir

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow

# One test that starts the session's PostgreSQL (the largest directory) and one that uses
# pytest's tmp_path.
INNER_TESTS = [
    "tests/storage/test_database.py::test_run_commits_and_calls_after_commit_hooks",
    "tests/unit/test_config.py::test_defaults_apply_without_any_file",
]


def _run_inner(tmpdir: Path, **env: str) -> subprocess.CompletedProcess[str]:
    # the run's own settings only: no kept directory, no server of the caller's, no options
    # (a --basetemp there would point the inner run at the outer run's directory)
    child_env = {k: v for k, v in os.environ.items()
                 if k not in ("E2A_KEEP_TEST_TMP", "E2A_TEST_PGDIR", "PYTEST_ADDOPTS")}
    child_env.update(TMPDIR=str(tmpdir), **env)
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", *INNER_TESTS],
        cwd=REPO, env=child_env, capture_output=True, text=True, timeout=240, check=False,
    )


def test_a_run_leaves_nothing_in_the_temporary_directory():
    tmpdir = reachable_tmpdir("e2a-inner-")
    try:
        proc = _run_inner(tmpdir)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "2 passed" in proc.stdout
        assert os.listdir(tmpdir) == []
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def test_keep_variable_keeps_the_run_directory_and_names_it():
    tmpdir = reachable_tmpdir("e2a-inner-")
    try:
        proc = _run_inner(tmpdir, E2A_KEEP_TEST_TMP="1")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        [kept] = os.listdir(tmpdir)
        assert kept.startswith("e2a-tests-")
        assert f"temporary files kept in {tmpdir / kept}" in proc.stderr
        # the session's PostgreSQL lived under it, not beside it
        assert any(p.name.startswith("e2a-test-pg-") for p in (tmpdir / kept).iterdir())
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def test_this_run_writes_under_its_own_directory():
    run_root = Path(tempfile.gettempdir())
    assert run_root.name.startswith("e2a-tests-")
    assert os.environ["TMPDIR"] == str(run_root)  # for the processes tests start
    assert Path(system_tmpdir()) != run_root  # what outlives a run (the type checker's cache)
    data_dir = Path(make_test_config().data_dir)
    assert data_dir.is_dir() and data_dir.parent == run_root
    assert make_test_config().data_dir == str(data_dir)  # one per test process: the DKIM key is made once
