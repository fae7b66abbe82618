"""Running servers for tests: ours in a background thread, a sink, raw-socket dialogs."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Callable, Coroutine
from dataclasses import replace
from typing import Any

from aiosmtpd.controller import Controller

from mailforward.config import DatabaseSettings, ServerSettings, Settings
from mailforward.delivery.base import Delivery, RecordingDelivery
from mailforward.smtpd.server import MailServer
from mailforward.tables import open_table

HOSTNAME = "mail.example.com"


class LoopThread:
    """An event loop in a thread, so blocking clients (smtplib, sockets) can talk to it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, Any], timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


class ServerThread:
    """``MailServer`` on 127.0.0.1, an ephemeral port, with a recording delivery."""

    def __init__(self, database: DatabaseSettings, delivery: Delivery | None = None,
                 **server_options: Any) -> None:
        options = {"hostname": HOSTNAME, "listen": ("127.0.0.1:0",), **server_options}
        self.settings = Settings(server=ServerSettings(**options), database=database)
        self.delivery = delivery if delivery is not None else RecordingDelivery()
        self.loops = LoopThread()
        self.table = self.loops.run(open_table(database))
        self.server = MailServer(self.settings, self.table, self.delivery)
        self.host, self.port = self.loops.run(self.server.start())[0]

    @property
    def messages(self) -> list[Any]:
        assert isinstance(self.delivery, RecordingDelivery)
        return self.delivery.messages

    def close(self) -> None:
        self.loops.run(self.server.stop())
        self.loops.run(self.table.close())
        self.loops.close()


class RawClient:
    """A socket speaking SMTP by hand, for malformed input."""

    def __init__(self, host: str, port: int, timeout: float = 10, source: str | None = None) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout,
                                             source_address=(source, 0) if source else None)
        self.file = self.sock.makefile("rb")

    def read_reply(self) -> str:
        """The last line of one (possibly multi-line) reply, or '(closed)'."""
        while True:
            line = self.file.readline()
            if not line:
                return "(closed)"
            text = line.decode("latin-1").rstrip("\r\n")
            if len(text) < 4 or text[3] != "-":
                return text

    def send(self, data: bytes | str) -> None:
        self.sock.sendall(data.encode("latin-1") if isinstance(data, str) else data)

    def command(self, line: str) -> str:
        self.send(line + "\r\n")
        return self.read_reply()

    def close(self) -> None:
        self.file.close()  # the socket stays open while its makefile() object lives
        self.sock.close()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SinkHandler:
    def __init__(self) -> None:
        self.envelopes: list[tuple[str, list[str], bytes]] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.envelopes.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.content))
        return "250 2.0.0 Ok: sunk"


def start_sink() -> tuple[Controller, SinkHandler]:
    handler = SinkHandler()
    controller = Controller(handler, hostname="127.0.0.1", port=free_port())
    controller.start()
    return controller, handler


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(host: str, port: int, timeout: float = 15,
                  alive: Callable[[], bool] = lambda: True) -> None:
    import time
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and alive():
        try:
            socket.create_connection((host, port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listening on {host}:{port}")


__all__ = ["HOSTNAME", "RawClient", "ServerThread", "replace", "start_sink", "free_port",
           "wait_for_port"]
