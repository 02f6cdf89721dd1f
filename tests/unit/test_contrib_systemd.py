"""The shipped systemd unit is one systemd itself accepts."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parents[2] / "contrib" / "systemd" / "e2a.service"


def test_unit_hardening_directives_present() -> None:
    """The unit keeps the hardening the deployment guide promises."""
    text = UNIT.read_text()
    for directive in (
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "StateDirectory=e2a",
        "AmbientCapabilities=CAP_NET_BIND_SERVICE",
        "Restart=on-failure",
    ):
        assert directive in text


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_unit_verifies_with_systemd_analyze(tmp_path: Path) -> None:
    """`systemd-analyze verify` accepts the unit (its ExecStart pointed at this venv's twistd)."""
    twistd = Path(sys.executable).parent / "twistd"
    assert twistd.exists()
    unit = tmp_path / "e2a.service"
    unit.write_text(UNIT.read_text().replace("/opt/e2a/bin/twistd", str(twistd)))
    done = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "e2a.service" not in done.stderr, done.stderr
