"""The systemd unit in contrib/, checked by systemd's own verifier."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parents[1] / "contrib" / "mailforward.service"
INSTALLED_AT = "/opt/mailforward/.venv/bin/mailforward"


def verify(unit_text: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """``systemd-analyze verify`` on the unit, its ExecStart pointed at this interpreter's
    mailforward (the verifier insists that the program exists)."""
    if shutil.which("systemd-analyze") is None:
        pytest.fail("systemd-analyze is missing (apt-get install systemd); .ci/run installs it")
    program = Path(sys.executable).with_name("mailforward")
    unit = tmp_path / "mailforward.service"
    unit.write_text(unit_text.replace(INSTALLED_AT, str(program)))
    return subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                          text=True, timeout=60, check=False)


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    result = verify(UNIT.read_text(), tmp_path)
    assert result.returncode == 0 and result.stderr == "", result.stderr


def test_the_verifier_would_notice_a_mistake(tmp_path: Path) -> None:
    result = verify(UNIT.read_text().replace("ProtectHome=yes", "ProtectHomes=yes"), tmp_path)
    assert "ProtectHomes" in result.stderr


def test_unit_reloads_with_sighup_and_keeps_only_the_port_25_capability() -> None:
    text = UNIT.read_text()
    assert "ExecReload=/bin/kill -HUP $MAINPID" in text
    assert "AmbientCapabilities=CAP_NET_BIND_SERVICE" in text and "User=mailforward" in text
