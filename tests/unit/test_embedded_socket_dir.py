"""Where the embedded server's Unix socket goes (PostgreSQL refuses a path over 107 bytes)."""

from __future__ import annotations

from pathlib import Path

import pytest

from e2a.store.embedded import MAX_SOCKET_DIR, socket_dir_for

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
    assert len(str(chosen / ".s.PGSQL.5432")) <= 107


def test_one_data_directory_one_socket_directory():
    assert socket_dir_for(LONG, "/tmp") == socket_dir_for(LONG, "/tmp")
    assert socket_dir_for(LONG, "/tmp") != socket_dir_for(Path(str(LONG) + "2"), "/tmp")
