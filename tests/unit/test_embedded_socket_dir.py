"""Where the embedded server's Unix socket goes (PostgreSQL refuses a path over 107 bytes)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from e2a.store.embedded import MAX_SOCKET_DIR, EmbeddedPostgresError, claim_socket_dir, socket_dir_for

SHORT = Path("/srv/e2a/data/pg")
LONG = Path("/srv/" + "d" * 120 + "/pg")
LONG_TMP = "/tmp/" + "t" * 70


@pytest.mark.parametrize(
    ("pgdata", "tmpdir", "expected_parent"),
    [
        (SHORT, "/tmp", None),  # the data directory itself
        (Path("/" + "x" * (MAX_SOCKET_DIR - 1)), "/tmp", None),  # exactly at the limit
        (LONG, "/tmp", "/tmp"),
        (LONG, "/run/user/1000", "/run/user/1000"),
        (LONG, LONG_TMP, "/tmp"),  # a temporary directory too long for the socket itself
    ],
)
def test_socket_dir(pgdata, tmpdir, expected_parent):
    chosen = socket_dir_for(pgdata, tmpdir)
    if expected_parent is None:
        assert chosen == pgdata
    else:
        assert chosen.parent == Path(expected_parent)
        assert chosen.name.startswith("e2a-pg-") and len(chosen.name) == len("e2a-pg-") + 16
    assert len(os.fsencode(chosen / ".s.PGSQL.5432")) <= 103  # macOS's limit; Linux's is 107


def test_one_data_directory_one_socket_directory():
    assert socket_dir_for(LONG, "/tmp") == socket_dir_for(LONG, "/tmp")
    assert socket_dir_for(LONG, "/tmp") != socket_dir_for(Path(str(LONG) + "2"), "/tmp")


def test_claim_creates_a_private_directory(tmp_path):
    path = tmp_path / "e2a-pg-0123456789abcdef"
    assert claim_socket_dir(path, [os.geteuid()]) is True
    assert stat.S_IMODE(path.stat().st_mode) == 0o700
    assert claim_socket_dir(path, [os.geteuid()]) is False  # ours, private: used as it is


@pytest.mark.parametrize("make", ["open_to_others", "symlink", "other_owner"])
def test_claim_refuses_a_directory_somebody_else_could_control(tmp_path, make):
    """A predictable name in a shared directory: one made first by another user, open to others,
    or a link is refused, never used for the socket e2a connects to as postgres."""
    path = tmp_path / "e2a-pg-0123456789abcdef"
    if make == "open_to_others":
        path.mkdir()
        path.chmod(0o777)
    elif make == "symlink":
        target = tmp_path / "elsewhere"
        target.mkdir(mode=0o700)
        path.symlink_to(target)
    else:
        if os.geteuid() != 0:
            pytest.skip("only root can give a directory to another user")
        path.mkdir(mode=0o700)
        os.chown(path, 54321, -1)
    with pytest.raises(EmbeddedPostgresError, match="not a private directory"):
        claim_socket_dir(path, [os.geteuid()])


def test_claim_accepts_the_servers_own_user(tmp_path):
    """Run as root, the directory is handed to the server's user; the next start accepts it."""
    if os.geteuid() != 0:
        pytest.skip("only root can give a directory to another user")
    path = tmp_path / "e2a-pg-0123456789abcdef"
    path.mkdir(mode=0o700)
    os.chown(path, 54321, -1)
    assert claim_socket_dir(path, [0, 54321]) is False
