"""``mailforward queue`` and the promise behind 250: acknowledged mail survives a crash."""

from __future__ import annotations

import asyncio
import json
import smtplib
import time
from pathlib import Path
from typing import Any

from click.testing import CliRunner

from mailforward.admin import Admin
from mailforward.cli import main
from mailforward.config import DatabaseSettings
from mailforward.delivery.base import Message
from mailforward.delivery.spool import Spool
from mailforward.tables import open_admin_database

from smtp_harness import HOSTNAME, ServeProcess, Sink

MARKER = b"queue-body-marker-5be1"


def _spool_one(directory: Path) -> str:
    message = Message("ABC123DEF0", "SRS0=x=YY=ext.test=a@example.org", ("b@dest.test", "c@dest.test"),
                      b"Subject: s\r\n\r\n" + MARKER + b"\r\n", original_sender="a@ext.test")
    Spool(directory).put(message, ["c@dest.test"], time.time(), time.time() + 300,
                         errors={"c@dest.test": "451 4.2.0 busy"})
    return message.queue_id


def _queue(directory: Path, *args: str) -> Any:
    return CliRunner().invoke(main, ["queue", *args],
                              env={"MAILFORWARD_DELIVERY__SPOOL_DIRECTORY": str(directory)})


def test_queue_list_shows_envelopes(tmp_path: Path) -> None:
    qid = _spool_one(tmp_path / "spool")
    result = _queue(tmp_path / "spool", "list", "--json")
    assert result.exit_code == 0
    (entry,) = json.loads(result.output)
    assert (entry["queue_id"], entry["pending"], entry["delivered"]) == (qid, ["c@dest.test"], ["b@dest.test"])


def test_queue_show_never_prints_the_body(tmp_path: Path) -> None:
    qid = _spool_one(tmp_path / "spool")
    result = _queue(tmp_path / "spool", "show", qid)
    assert result.exit_code == 0
    assert "c@dest.test" in result.output and "451 4.2.0 busy" in result.output
    assert MARKER.decode() not in result.output


def test_queue_flush_makes_messages_due(tmp_path: Path) -> None:
    _spool_one(tmp_path / "spool")
    assert "1 message(s)" in _queue(tmp_path / "spool", "flush").output
    assert Spool(tmp_path / "spool").due(time.time())


def test_queue_delete_removes_the_message(tmp_path: Path) -> None:
    qid = _spool_one(tmp_path / "spool")
    assert _queue(tmp_path / "spool", "delete", qid).exit_code == 0
    assert Spool(tmp_path / "spool").list() == []


def test_queue_rejects_a_path_as_queue_id(tmp_path: Path) -> None:
    result = _queue(tmp_path / "spool", "show", "../../etc/passwd")
    assert result.exit_code == 2
    assert "invalid queue id" in result.output


def test_queue_unknown_id_exits_2(tmp_path: Path) -> None:
    assert _queue(tmp_path / "spool", "delete", "NOPE0000").exit_code == 2


# ---------------------------------------------------------------- read-only commands


def test_queue_list_of_a_missing_spool_directory_creates_nothing(tmp_path: Path) -> None:
    missing = tmp_path / "var" / "spool" / "mailforward"
    result = _queue(missing, "list")
    assert result.exit_code == 0
    assert result.output.startswith("Mail queue is empty (spool directory ")
    assert json.loads(_queue(missing, "list", "--json").output) == []
    assert list(tmp_path.iterdir()) == []


def test_queue_show_of_a_missing_spool_directory_is_an_unknown_id_and_creates_nothing(
        tmp_path: Path) -> None:
    result = _queue(tmp_path / "spool", "show", "ABC123DEF0")
    assert result.exit_code == 2 and "ABC123DEF0: not in the spool" in result.output
    assert list(tmp_path.iterdir()) == []


def test_queue_flush_of_a_missing_spool_directory_is_an_error_and_creates_nothing(
        tmp_path: Path) -> None:
    result = _queue(tmp_path / "spool", "flush")
    assert result.exit_code == 1 and "does not exist" in result.output
    assert list(tmp_path.iterdir()) == []


def test_queue_list_and_show_leave_the_spool_directory_as_it_was(tmp_path: Path) -> None:
    qid = _spool_one(tmp_path / "spool")
    before = sorted(p.name for p in (tmp_path / "spool").iterdir())
    assert _queue(tmp_path / "spool", "list").exit_code == 0
    assert _queue(tmp_path / "spool", "show", qid).exit_code == 0
    assert sorted(p.name for p in (tmp_path / "spool").iterdir()) == before  # not even a .lock


def test_queue_show_says_when_a_pending_recipient_was_not_attempted_yet(tmp_path: Path) -> None:
    message = Message("DSN0000001", "", ("a@ext.test",), b"Subject: s\r\n\r\nbody\r\n",
                      original_queue_id="ABC123DEF0")
    Spool(tmp_path / "spool").put(message, message.recipients, time.time(), time.time())
    output = _queue(tmp_path / "spool", "show", "DSN0000001").output
    assert "pending:   <a@ext.test> (not attempted yet)" in output
    assert "reports on: ABC123DEF0" in output


# ---------------------------------------------------------------- hostile envelopes

ESC = "\x1b"
HOSTILE_SENDER = f"{ESC}]0;pwned\x07{ESC}[2Jx@ext.test"  # set the title, clear the screen


def _spool_hostile(directory: Path, sender: str = HOSTILE_SENDER,
                   rcpt: str = "c@dest.test", error: str = "451 4.2.0 busy") -> str:
    message = Message("BAD0000001", sender, (rcpt,), b"Subject: s\r\n\r\nbody\r\n")
    Spool(directory).put(message, [rcpt], time.time(), time.time() + 300, errors={rcpt: error})
    return message.queue_id


def test_queue_list_escapes_terminal_escapes_in_the_sender(tmp_path: Path) -> None:
    _spool_hostile(tmp_path / "spool")
    output = _queue(tmp_path / "spool", "list").output
    assert ESC not in output and "\x07" not in output
    assert "<\\x1b]0;pwned\\x07\\x1b[2Jx@ext.test>" in output


def test_queue_show_escapes_del_and_c1_controls_in_recipients(tmp_path: Path) -> None:
    qid = _spool_hostile(tmp_path / "spool", rcpt="a\x7fb\x9bc@dest.test")
    output = _queue(tmp_path / "spool", "show", qid).output
    assert "pending:   <a\\x7fb\\xc2\\x9bc@dest.test>" in output


def test_queue_show_escapes_control_characters_in_reasons(tmp_path: Path) -> None:
    qid = _spool_hostile(tmp_path / "spool", error=f"550 5.1.1 {ESC}[31mred\r\nline")
    output = _queue(tmp_path / "spool", "show", qid).output
    assert "550 5.1.1 \\x1b[31mred\\x0d\\x0aline" in output


def test_queue_show_escapes_bytes_that_were_not_utf8(tmp_path: Path) -> None:
    undecodable = b"\xff\xfeuser@ext.test".decode("utf-8", "surrogateescape")
    qid = _spool_hostile(tmp_path / "spool", sender=undecodable)
    output = _queue(tmp_path / "spool", "show", qid).output
    assert "sender:    <\\xff\\xfeuser@ext.test>" in output


def test_queue_show_prints_printable_utf8_as_it_is(tmp_path: Path) -> None:
    qid = _spool_hostile(tmp_path / "spool", sender="s\u00e9nder@ext.test")
    assert "sender:    <s\u00e9nder@ext.test>" in _queue(tmp_path / "spool", "show", qid).output


def test_queue_json_holds_no_raw_control_characters(tmp_path: Path) -> None:
    _spool_hostile(tmp_path / "spool", rcpt="a\x7fb\x9bc@dest.test")
    output = _queue(tmp_path / "spool", "list", "--json").output
    assert not any(c in output for c in (ESC, "\x07", "\x7f", "\x9b"))
    (entry,) = json.loads(output)
    assert (entry["sender"], entry["pending"]) == (HOSTILE_SENDER, ["a\x7fb\x9bc@dest.test"])


# ---------------------------------------------------------------- crash safety


def test_acknowledged_mail_survives_a_crash_and_is_delivered_after_restart(
        seeded_database: DatabaseSettings, tmp_path: Path) -> None:
    async def add_alias() -> None:
        db = await open_admin_database(seeded_database)
        await Admin(db).add_alias("split@example.org", "now@sink.test,later@sink.test")
        await db.close()
    asyncio.run(add_alias())
    with Sink() as sink:
        sink.defer = {"later@sink.test"}
        config = tmp_path / "mf.toml"
        config.write_text(f'[server]\nhostname = "{HOSTNAME}"\nlisten = ["127.0.0.1:0"]\n'
                          f'[database]\nurl = "{seeded_database.url}"\n'
                          f'[delivery]\nrelay_host = "[127.0.0.1]:{sink.port}"\n'
                          f'spool_directory = "{tmp_path / "spool"}"\n'
                          '[auth]\nverify = false\n')
        with ServeProcess(config) as served:
            with smtplib.SMTP("127.0.0.1", served.port, local_hostname="client.test") as s:
                assert s.sendmail("sender@ext.test", ["split@example.org"],
                                  b"From: sender@ext.test\r\nSubject: x\r\n\r\nbody\r\n") == {}
            served.kill()  # the crash, right after the 250
            assert [a.rcpt_tos for a in sink.arrivals] == [["now@sink.test"]]
            sink.defer = set()
            served.restart()
            assert "1 message(s)" in CliRunner().invoke(
                main, ["--config", str(config), "queue", "flush"]).output
            sink.wait_for(lambda arrivals: len(arrivals) >= 2, timeout=20)
        assert [a.rcpt_tos for a in sink.arrivals] == [["now@sink.test"], ["later@sink.test"]]
