"""``mailforward config check`` and ``config show``: postconf's two jobs."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner, Result

from mailforward.cli import main


def run(config: Path, *args: str) -> Result:
    return CliRunner().invoke(main, ["--config", str(config), "config", *args], env={})


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "mailforward.toml"
    path.write_text(text)
    return path


def test_check_accepts_a_valid_configuration(tmp_path: Path) -> None:
    result = run(write(tmp_path, '[server]\nhostname = "mx.example.net"\n'), "check")
    assert result.exit_code == 0 and "configuration OK" in result.output


def test_check_refuses_a_bad_value_naming_the_key(tmp_path: Path) -> None:
    result = run(write(tmp_path, "[server]\nrecipient_limit = 0\n"), "check")
    assert result.exit_code == 2 and "[server] recipient_limit" in result.output


def test_check_refuses_what_serve_would_refuse_at_start(tmp_path: Path) -> None:
    config = write(tmp_path, f'[srs]\ndomain = "fwd.example.net"\nsecret_file = "{tmp_path}/none"\n')
    result = run(config, "check")
    assert result.exit_code == 2 and "secret file" in result.output


def test_check_refuses_an_unreadable_certificate(tmp_path: Path) -> None:
    config = write(tmp_path, f'[server]\ntls_cert = "{tmp_path}/c.pem"\ntls_key = "{tmp_path}/k.pem"\n')
    result = run(config, "check")
    assert result.exit_code == 2 and "tls_cert" in result.output


def test_show_prints_only_what_differs_from_the_defaults(tmp_path: Path) -> None:
    result = run(write(tmp_path, '[server]\nhostname = "mx.example.net"\nhopcount_limit = 50\n'),
                 "show")
    assert result.output == '[server]\nhostname = "mx.example.net"\n'


def test_show_all_prints_the_defaults_too(tmp_path: Path) -> None:
    result = run(write(tmp_path, ""), "show", "--all")
    assert "hopcount_limit = 50" in result.output and "[delivery]" in result.output


def test_show_redacts_the_database_password(tmp_path: Path) -> None:
    config = write(tmp_path, '[database]\nurl = "mysql://maildb:s3cret@127.0.0.1/maildb"\n')
    result = run(config, "show")
    assert "s3cret" not in result.output
    assert 'url = "mysql://maildb:********@127.0.0.1/maildb"' in result.output


def test_show_redacts_the_redis_password(tmp_path: Path) -> None:
    config = write(tmp_path, '[limits]\nredis_url = "redis://:hunter2@127.0.0.1:6379/0"\n')
    result = run(config, "show")
    assert "hunter2" not in result.output and "********" in result.output
