"""``mailforward dkim keygen``: a private key OpenDKIM and we can read, and the record to publish."""

from __future__ import annotations

import stat
from pathlib import Path

from click.testing import CliRunner, Result

from mailforward.auth.dkim import load_key
from mailforward.cli import main


def keygen(tmp_path: Path, *args: str) -> Result:
    return CliRunner().invoke(main, ["dkim", "keygen", *args, "--directory", str(tmp_path)],
                              env={"MAILFORWARD_DELIVERY__SPOOL_DIRECTORY": str(tmp_path / "spool")})


def test_keygen_writes_a_private_key_readable_only_by_its_owner(tmp_path: Path) -> None:
    assert keygen(tmp_path, "example.org", "--selector", "s1", "--bits", "1024").exit_code == 0
    assert stat.S_IMODE((tmp_path / "s1.private").stat().st_mode) == 0o600


def test_keygen_prints_the_txt_record_of_the_key_it_wrote(tmp_path: Path) -> None:
    result = keygen(tmp_path, "example.org", "--selector", "s1", "--bits", "1024")
    key = load_key("example.org", "s1", str(tmp_path / "s1.private"))
    assert "s1._domainkey.example.org. IN TXT" in result.output
    assert key.public_key_base64() in result.output.replace('" "', "")


def test_keygen_prints_the_opendkim_table_lines(tmp_path: Path) -> None:
    result = keygen(tmp_path, "example.org", "--selector", "s1", "--bits", "1024")
    assert f"s1._domainkey.example.org example.org:s1:{tmp_path / 's1.private'}" in result.output
    assert "*@example.org s1._domainkey.example.org" in result.output


def test_keygen_makes_ed25519_keys(tmp_path: Path) -> None:
    result = keygen(tmp_path, "example.org", "--selector", "e1", "--type", "ed25519")
    assert result.exit_code == 0 and "k=ed25519" in result.output


def test_keygen_never_overwrites_an_existing_key(tmp_path: Path) -> None:
    keygen(tmp_path, "example.org", "--selector", "s1", "--bits", "1024")
    before = (tmp_path / "s1.private").read_bytes()
    result = keygen(tmp_path, "example.org", "--selector", "s1", "--bits", "1024")
    assert result.exit_code == 2 and "already exists" in result.output
    assert (tmp_path / "s1.private").read_bytes() == before


def test_keygen_rejects_an_unknown_key_type(tmp_path: Path) -> None:
    result = keygen(tmp_path, "example.org", "--selector", "s1", "--type", "dsa")
    assert result.exit_code == 2 and "--type" in result.output


def test_keygen_rejects_a_short_rsa_key(tmp_path: Path) -> None:
    result = keygen(tmp_path, "example.org", "--selector", "s1", "--bits", "512")
    assert result.exit_code == 2 and "--bits" in result.output


def test_keygen_rejects_an_invalid_domain(tmp_path: Path) -> None:
    result = keygen(tmp_path, "not a domain", "--selector", "s1")
    assert result.exit_code == 2 and "invalid domain" in result.output


def test_keygen_never_writes_into_the_current_directory_by_default() -> None:
    result = CliRunner().invoke(main, ["dkim", "keygen", "--help"])
    assert "/etc/mailforward/dkim" in result.output
