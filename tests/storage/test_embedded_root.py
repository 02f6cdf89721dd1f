"""Running as root, the embedded PostgreSQL changes nothing outside the data directory: it
refuses a data dir its system user cannot reach (one line, with the fix) and copies binaries
it cannot read into the data dir, saying what it created (e2a.store.embedded)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from e2a.store.embedded import (
    BINARIES_COPY,
    EmbeddedPostgres,
    EmbeddedSettings,
    EmbeddedUnreachable,
    install_parts,
    pid_alive,
    postgres_install_dir,
)
from tests.support.dirs import reachable_tmpdir

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="the root-only path of the embedded PostgreSQL"),
]


def _snapshot(paths: list[Path], exclude: Path | None = None) -> dict[str, tuple[int, int, int]]:
    """(mode, uid, gid) of each path, of everything below each directory, and of every ancestor."""
    seen: dict[str, tuple[int, int, int]] = {}

    def record(p: Path) -> None:
        st = os.lstat(p)
        seen[str(p)] = (st.st_mode, st.st_uid, st.st_gid)

    for root in paths:
        for parent in root.absolute().parents:
            record(parent)
        record(root)
        if root.is_dir():
            for dirpath, dirnames, filenames in os.walk(root):
                if exclude is not None and Path(dirpath) == exclude:
                    dirnames.clear()
                    continue
                for name in (*dirnames, *filenames):
                    p = Path(dirpath, name)
                    if exclude is None or p != exclude:
                        record(p)
    return seen


def lasting_creations(server: EmbeddedPostgres) -> list[str]:
    """What ``server``'s start created that outlives it: its ``created`` without the socket
    directory it makes at every start, and removes at stop, when the data dir's path is too long
    for PostgreSQL's socket (a long TMPDIR)."""
    return [c for c in server.created if not c.startswith(f"{server.socket_dir} (socket directory")]


def test_root_start_changes_no_mode_outside_the_data_dir():
    """Start and stop as root: no mode/owner change anywhere outside the data dir (its parents,
    siblings, the installed PostgreSQL); the data dir itself only gains o+x."""
    root = reachable_tmpdir("e2a-root-")
    (root / "srv").mkdir(mode=0o755)
    (root / "srv" / "sibling").write_text("x")
    data_dir = root / "srv" / "data"
    watched = [root, postgres_install_dir()]
    before = _snapshot(watched, exclude=data_dir)
    server = EmbeddedPostgres(EmbeddedSettings(data_dir / "pg"))
    server.thd_start()
    try:
        assert pid_alive(server.postmaster_pid)
        assert any(item.startswith(f"{data_dir / 'pg'} ") for item in server.created), server.created
    finally:
        server.thd_stop()
    after = _snapshot(watched, exclude=data_dir)
    assert before == after
    assert data_dir.stat().st_mode & 0o777 == 0o701
    shutil.rmtree(root, ignore_errors=True)


def test_root_start_refuses_a_data_dir_its_user_cannot_reach_in_one_line():
    """A data dir under a 0700 directory: one line naming that directory and the fix; the
    directory keeps its mode."""
    root = reachable_tmpdir("e2a-root-")
    locked = root / "locked"
    locked.mkdir(mode=0o700)
    server = EmbeddedPostgres(EmbeddedSettings(locked / "data" / "pg"))
    with pytest.raises(EmbeddedUnreachable) as info:
        server.thd_start()
    message = str(info.value)
    assert "\n" not in message
    assert f"{locked} is not searchable" in message
    assert "run e2a as a normal user" in message and "data_dir" in message
    assert locked.stat().st_mode & 0o777 == 0o700
    assert not server.owns_server
    shutil.rmtree(root, ignore_errors=True)


def test_root_start_copies_binaries_its_user_cannot_read_into_the_data_dir():
    """PostgreSQL installed under a 0700 directory: copied to <data_dir>/pgsql (said so), run
    from there, and the original keeps its modes."""
    root = reachable_tmpdir("e2a-root-")
    hidden = root / "hidden"
    hidden.mkdir(mode=0o700)
    bundled = postgres_install_dir()
    install = hidden / "site" / bundled.parent.name / bundled.name
    for part, place in install_parts(bundled):
        shutil.copytree(part, hidden / "site" / place, symlinks=True)
    before = _snapshot([hidden])
    data_dir = root / "data"
    server = EmbeddedPostgres(EmbeddedSettings(data_dir / "pg", install_dir=install))
    server.thd_start()
    try:
        assert pid_alive(server.postmaster_pid)
        assert any(str(data_dir / BINARIES_COPY) in item for item in server.created), server.created
        cmdline = Path(f"/proc/{server.postmaster_pid}/cmdline").read_bytes()
        assert str(data_dir / BINARIES_COPY).encode() in cmdline
    finally:
        server.thd_stop()
    assert _snapshot([hidden]) == before
    # a second start reuses the copy and creates nothing
    again = EmbeddedPostgres(EmbeddedSettings(data_dir / "pg", install_dir=install))
    again.thd_start()
    try:
        assert lasting_creations(again) == []
    finally:
        again.thd_stop()
    shutil.rmtree(root, ignore_errors=True)
