"""``mailforward queue`` and the promise behind 250: acknowledged mail survives a crash."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import smtplib
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller
from click.testing import CliRunner

from mailforward.admin import Admin
from mailforward.cli import main
from mailforward.config import DatabaseSettings
from mailforward.delivery.base import Message
from mailforward.delivery.spool import Spool
from mailforward.tables import open_admin_database

from smtp_harness import HOSTNAME, free_port, wait_for_port
from test_delivery import BehaviourSink

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


# ---------------------------------------------------------------- crash safety


def _start_serve(config: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, "-m", "mailforward", "--config", str(config), "serve"],
                            stdout=log.open("ab"), stderr=subprocess.STDOUT)
    wait_for_port("127.0.0.1", port, alive=lambda: proc.poll() is None)
    return proc


def test_acknowledged_mail_survives_a_crash_and_is_delivered_after_restart(
        seeded_database: DatabaseSettings, tmp_path: Path) -> None:
    async def add_alias() -> None:
        db = await open_admin_database(seeded_database)
        await Admin(db).add_alias("split@example.org", "now@sink.test,later@sink.test")
        await db.close()
    asyncio.run(add_alias())
    sink = BehaviourSink()
    controller = Controller(sink, hostname="127.0.0.1", port=free_port())
    controller.start()
    port = free_port()
    config = tmp_path / "mf.toml"
    config.write_text(f'[server]\nhostname = "{HOSTNAME}"\nlisten = ["127.0.0.1:{port}"]\n'
                      f'[database]\nurl = "{seeded_database.url}"\n'
                      f'[delivery]\nrelay_host = "[127.0.0.1]:{controller.port}"\n'
                      f'spool_directory = "{tmp_path / "spool"}"\n'
                      '[auth]\nverify = false\n')
    proc = _start_serve(config, port, tmp_path / "serve.log")
    try:
        with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test") as s:
            assert s.sendmail("sender@ext.test", ["split@example.org"], b"Subject: x\r\n\r\nbody\r\n") == {}
        os.kill(proc.pid, signal.SIGKILL)  # the crash, right after the 250
        proc.wait(10)
        assert [rcpts for _, rcpts, _ in sink.envelopes] == [["now@sink.test"]]
        sink.deferring = False
        proc = _start_serve(config, port, tmp_path / "serve.log")
        assert "1 message(s)" in CliRunner().invoke(
            main, ["--config", str(config), "queue", "flush"]).output
        deadline = time.monotonic() + 20
        while len(sink.envelopes) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert [rcpts for _, rcpts, _ in sink.envelopes] == [["now@sink.test"], ["later@sink.test"]]
    finally:
        proc.terminate()
        proc.wait(10)
        controller.stop()
