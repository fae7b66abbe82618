"""Test support, in one place: servers, sinks, loopback DNS, clocks and waiting.

* Waiting: :func:`wait_until` / :func:`async_wait_until` poll a condition
  until it holds, with a deadline; :func:`wait_until_consumed` waits until
  the peer of a socket has read everything sent on it; :meth:`Sink.wait_for`
  wakes on each arrival.  Tests never ``sleep()`` to let something happen.
* Clocks: :class:`Clock`, a settable clock for every ``clock=`` parameter.
* Ports: every server binds port 0 and reports the port it got; nothing binds
  a port, releases it and hands the number on.  Our programs log their ports
  (:func:`wait_for_log`); for one that does not (PostSRSd),
  :func:`listening_ports` reads them from ``/proc``.  :func:`held_port` keeps
  a port bound but not listening: connections to it are refused, and a
  program that must be told its port in advance can still take it over.
* Our server: :class:`ServerThread` (in this process), :class:`ServeProcess`
  (``mailforward serve`` as a subprocess, its port read from its log), and
  :class:`RawClient` to talk SMTP by hand.
* Sinks: :class:`Sink`, the one destination SMTP server of the tests, its
  answers chosen by the recipient's local part or set at run time;
  :class:`CommonPort` for sinks on several loopback addresses sharing a port.
* DNS: :func:`serve_zone`, and the fixtures ``dns_zone`` / ``loopback_dns`` /
  ``nameserver`` (registered in ``conftest.py``) serving a test module's
  ``ZONE`` (with its ``SERVFAIL`` and ``REFUSED`` names) on loopback;
  ``tests/dns_server.py`` is the server itself.
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import ssl
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable, Coroutine, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import pytest
from aiosmtpd.smtp import SMTP
from dnslib.server import BaseResolver

from mailforward.config import DatabaseSettings, ServerSettings, Settings
from mailforward.delivery.base import Delivery, RecordingDelivery
from mailforward.smtpd.server import MailServer
from mailforward.tables import open_table

from dns_server import LoopbackDNSServer, ZoneResolver

HOSTNAME = "mail.example.com"

T = TypeVar("T")

# --------------------------------------------------------------------------- waiting


def wait_until(condition: Callable[[], T | None], timeout: float = 10, *, what: str = "",
               interval: float = 0.01) -> T:
    """Poll ``condition`` until it returns something true, and return that.

    Returns as soon as the condition holds; raises ``TimeoutError`` when it
    still does not after ``timeout`` seconds.  Exceptions from the condition
    propagate (a condition may raise to say it can never hold).
    """
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise TimeoutError(f"not within {timeout:g} s: {what or getattr(condition, '__name__', '')}")
        time.sleep(interval)


async def async_wait_until(condition: Callable[[], T | None], timeout: float = 10, *,
                           what: str = "", interval: float = 0.01) -> T:
    """:func:`wait_until` for coroutines: the event loop keeps running while it polls."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise TimeoutError(f"not within {timeout:g} s: {what or getattr(condition, '__name__', '')}")
        await asyncio.sleep(interval)


@dataclass(frozen=True)
class TcpEntry:
    """One line of ``/proc/net/tcp``: a socket's addresses, state and queued bytes."""

    local: tuple[str, int]
    remote: tuple[str, int]
    listening: bool
    send_queue: int  # bytes sent and not yet acknowledged by the peer
    receive_queue: int  # bytes received and not yet read by the application
    inode: str


def _proc_address(text: str) -> tuple[str, int]:
    """``0100007F:1F90`` (IPv4, host byte order) as ("127.0.0.1", 8080); IPv6 left as hex."""
    host, port = text.split(":")
    if len(host) == 8:
        host = socket.inet_ntoa(int(host, 16).to_bytes(4, sys.byteorder))
    return host, int(port, 16)


def tcp_table(pid: int | str = "self") -> list[TcpEntry]:
    """The TCP sockets of the network namespace of process ``pid``, from ``/proc``."""
    entries = []
    for name in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{name}").read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            fields = line.split()
            send_queue, _, receive_queue = fields[4].partition(":")
            entries.append(TcpEntry(_proc_address(fields[1]), _proc_address(fields[2]),
                                    fields[3] == "0A", int(send_queue, 16), int(receive_queue, 16),
                                    fields[9]))
    return entries


def wait_until_consumed(sock: socket.socket, timeout: float = 10) -> None:
    """Wait until the peer of ``sock`` (on this machine) has read everything sent on it.

    For tests about how bytes arrive in pieces: the next ``send`` then reaches
    a server that has already taken the previous piece.
    """
    local, peer = sock.getsockname()[:2], sock.getpeername()[:2]

    def consumed() -> bool:
        ours = [e for e in tcp_table() if e.local == local and e.remote == peer]
        theirs = [e for e in tcp_table() if e.local == peer and e.remote == local]
        return bool(ours and theirs) and ours[0].send_queue == 0 and theirs[0].receive_queue == 0

    wait_until(consumed, timeout, what=f"the peer {peer} reading what {local} sent")


# --------------------------------------------------------------------------- clocks


class Clock:
    """A settable clock for code that takes ``clock=``: calling it gives ``now``."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


# --------------------------------------------------------------------------- ports


@contextmanager
def held_port(host: str = "127.0.0.1") -> Iterator[int]:
    """A port bound on ``host`` and held, never listening, for the ``with`` block.

    Connections to it are refused (nothing listens there, and nothing else can
    bind it in the meantime).  A program that binds it with ``SO_REUSEADDR``
    (asyncio servers do) can still listen on it: the way to hand a port to a
    program that must be told its port before it starts.
    """
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, 0))
        yield int(sock.getsockname()[1])


def listening_ports(pid: int) -> list[int]:
    """The TCP ports process ``pid`` listens on, in the order it opened them (descriptor order):
    for a program that binds port 0 and does not say which port it got."""
    sockets: dict[str, int] = {}
    fd_directory = Path(f"/proc/{pid}/fd")
    for fd in os.listdir(fd_directory):
        try:
            target = os.readlink(fd_directory / fd)
        except OSError:  # closed meanwhile
            continue
        if target.startswith("socket:["):
            sockets[target[len("socket:["):-1]] = int(fd)
    listening = [(sockets[e.inode], e.local[1]) for e in tcp_table(pid)
                 if e.listening and e.inode in sockets]
    return [port for _, port in sorted(listening)]


def wait_for_listening_ports(proc: subprocess.Popen[Any], count: int, timeout: float = 15) -> list[int]:
    """The first ``count`` ports the subprocess listens on, once it listens on that many."""
    def listening() -> list[int] | None:
        if proc.poll() is not None:
            raise RuntimeError(f"process {proc.args!r} exited with {proc.returncode}")
        ports = listening_ports(proc.pid)
        return ports[:count] if len(ports) >= count else None

    return wait_until(listening, timeout, what=f"{proc.args!r} listening on {count} port(s)")


# --------------------------------------------------------------------------- our server


class LoopThread:
    """An event loop in a thread, so blocking clients (smtplib, sockets) can talk to it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
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

    def open_connections(self, ip: str = "127.0.0.1") -> int:
        """Sessions of client ``ip`` the server counts as open (one ends when its session has)."""
        async def count() -> int:
            return self.server.handler.limits.open_connections(ip)
        return self.loops.run(count())

    def close(self) -> None:
        self.loops.run(self.server.stop())
        self.loops.run(self.table.close())
        self.loops.close()


def wait_for_log(proc: subprocess.Popen[Any], log: Path, pattern: str, count: int = 1,
                 timeout: float = 30) -> list[re.Match[str]]:
    """The first ``count`` matches of ``pattern`` in what ``proc`` logged to ``log``.

    Our log lines carry the process id (``name[pid]: message``), so lines of
    an earlier process appending to the same file are not taken.  Raises
    when ``proc`` exits first, with the end of the log.
    """
    line = re.compile(rf"\[{proc.pid}\]: .*?{pattern}")

    def logged() -> list[re.Match[str]] | None:
        text = log.read_text(encoding="utf-8", errors="replace")
        found = list(line.finditer(text))
        if len(found) >= count:
            return found[:count]
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}:\n{text[-4000:]}")
        return None

    try:
        return wait_until(logged, timeout, what=f"{pattern!r} logged by {proc.args!r}")
    except TimeoutError as e:
        raise TimeoutError(f"{e}; the log:\n{log.read_text(errors='replace')[-4000:]}") from None


class ServeProcess:
    """``mailforward serve`` as a subprocess, stdout and stderr appended to ``log``.

    Configure ``listen = ["127.0.0.1:0"]``: the server binds an ephemeral port
    and logs ``listening on HOST:PORT``; ``port`` is read from that line (the
    one with this process's pid, so a restart appending to the same log is
    not confused by the previous run's line).
    """

    def __init__(self, config: Path, log: Path | None = None, *, start_timeout: float = 30) -> None:
        self.config = config
        self.log = log if log is not None else config.with_name("serve.log")
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen[bytes]
        self.start()

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "mailforward", "--config", str(self.config), "serve"],
                stdout=out, stderr=subprocess.STDOUT)
        try:
            found = wait_for_log(self.proc, self.log, r"listening on (\S+):(\d+) as ",
                                 timeout=self.start_timeout)
        except (RuntimeError, TimeoutError):
            self.stop()
            raise
        self.host, self.port = found[0][1], int(found[0][2])

    def log_text(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def kill(self) -> None:
        """SIGKILL: a crash, nothing cleaned up."""
        self.proc.kill()  # by PID (Popen.kill signals proc.pid)
        self.proc.wait(10)

    def restart(self) -> None:
        """Start again (after :meth:`kill`); the new process has a new port."""
        self.start()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def __enter__(self) -> ServeProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


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


# --------------------------------------------------------------------------- sinks

REJECTED = "550 5.1.1 No such user here"
# Postfix's refusal of an unknown virtual recipient, naming the address.
USER_UNKNOWN = "Recipient address rejected: User unknown in virtual mailbox table"
SLOW_DATA_SECONDS = 3.0  # what a "slow*" recipient makes the sink take to answer DATA


@dataclass(frozen=True)
class Arrival:
    """One message as the sink received it."""

    mail_from: str  # "<>" for the null sender, as aiosmtpd writes it
    rcpt_tos: list[str]
    content: bytes  # the exact bytes, dot-unstuffed
    mail_options: list[str]  # MAIL FROM parameters (upper-cased by aiosmtpd; DSN ones as sent)
    rcpt_options: list[list[str]]  # RCPT TO parameters, one list per recipient
    smtp_utf8: bool
    tls: bool  # did it arrive over STARTTLS?


def _local_part(address: str) -> str:
    return address.rpartition("@")[0] if "@" in address else address


_DSN_MAIL = frozenset({"RET", "ENVID"})
_DSN_RCPT = frozenset({"NOTIFY", "ORCPT"})


def _take_parameters(arg: str | None, names: frozenset[str]) -> tuple[str | None, list[str]]:
    """``arg`` without the ``NAME=value`` parameters in ``names``, and those parameters."""
    if arg is None:
        return None, []
    kept: list[str] = []
    taken: list[str] = []
    for word in arg.split(" "):
        (taken if word.partition("=")[0].upper() in names else kept).append(word)
    return " ".join(kept), taken


class _SinkSMTP(SMTP):
    """aiosmtpd's protocol; with ``dsn``, RFC 3461's parameters accepted and recorded."""

    sink: Sink

    async def smtp_MAIL(self, arg: str | None) -> None:
        dsn: list[str] = []
        if self.sink.dsn:
            arg, dsn = _take_parameters(arg, _DSN_MAIL)
        await super().smtp_MAIL(arg)
        if dsn and self.envelope is not None and self.envelope.mail_from:
            self.envelope.mail_options.extend(dsn)

    async def smtp_RCPT(self, arg: str | None) -> None:
        self.dsn_rcpt: list[str] = []
        if self.sink.dsn:
            arg, self.dsn_rcpt = _take_parameters(arg, _DSN_RCPT)
        await super().smtp_RCPT(arg)


class Sink:
    """A destination SMTP server for the tests: aiosmtpd's protocol on a listener of our own.

    ``start()`` binds ``host`` on port 0 (or the ``port`` given) and sets
    ``port``.  Every accepted message is kept in ``arrivals``.  The answer to a
    recipient depends on its local part:

    ``reject*``  550 5.1.1 No such user here (the address not named)
    ``nosuch*``  550 5.1.1 <address>: Recipient address rejected: User unknown in
                 virtual mailbox table (Postfix's text, naming the address)
    ``shout*``   550 5.1.1 mailbox ADDRESS does not exist (named upper-case, bare)
    ``defer*``   451 4.2.0 <address>: mailbox busy
    ``slow*``    accepted; DATA answered after ``SLOW_DATA_SECONDS``
    ``drop*``    accepted; the connection is closed instead of the DATA reply

    and on sets a test changes at run time: addresses in ``defer`` are
    deferred as ``defer*``, in ``refuse`` refused as ``nosuch*``; a message
    for an address in ``hang`` is never answered (``hanging`` is set, and the
    sink waits until the client goes away).  Everything else is accepted.

    Options: ``refuse_all`` (every recipient gets ``REJECTED``),
    ``smtputf8`` and ``eightbitmime`` (both offered unless False), ``dsn`` (RFC 3461 offered; its
    parameters kept in ``mail_options`` / ``rcpt_options``), ``tls``
    (certificate and key files: STARTTLS offered), ``data_size_limit``,
    ``line_length_limit`` (aiosmtpd's default is RFC 5321's 1001) and
    ``ehlo`` (a function rewriting the EHLO reply lines).
    """

    def __init__(self, host: str = "127.0.0.1", *, refuse_all: bool = False, smtputf8: bool = True,
                 eightbitmime: bool = True, dsn: bool = False, tls: tuple[Path, Path] | None = None,
                 data_size_limit: int | None = 33554432, line_length_limit: int | None = None,
                 ehlo: Callable[[list[str]], list[str]] | None = None,
                 hostname: str = "sink.test") -> None:
        self.host, self.hostname = host, hostname
        self.refuse_all, self.smtputf8, self.eightbitmime, self.dsn = refuse_all, smtputf8, eightbitmime, dsn
        self.data_size_limit = data_size_limit
        self.ehlo = ehlo
        self.tls_context: ssl.SSLContext | None = None
        if tls is not None:
            self.tls_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            self.tls_context.load_cert_chain(*tls)
        limits = {"line_length_limit": line_length_limit} if line_length_limit else {}
        self._protocol_class: type[_SinkSMTP] = type("SinkSMTP", (_SinkSMTP,), {"sink": self, **limits})
        self.port = 0
        self.arrivals: list[Arrival] = []
        self.defer: set[str] = set()
        self.refuse: set[str] = set()
        self.hang: set[str] = set()
        self.hanging = threading.Event()
        self._changed = threading.Condition()
        self._loops: LoopThread | None = None
        self._server: asyncio.Server | None = None
        self._connections: weakref.WeakSet[SMTP] = weakref.WeakSet()  # open ones: transports hold them

    # --- running

    def start(self, port: int = 0) -> Sink:
        loops = LoopThread()
        try:
            self._server = loops.run(loops.loop.create_server(self._protocol, self.host, port))
        except BaseException:
            loops.close()
            raise
        self._loops = loops
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    def _protocol(self) -> SMTP:
        assert self._loops is not None
        protocol = self._protocol_class(self, data_size_limit=self.data_size_limit,
                                        enable_SMTPUTF8=self.smtputf8, hostname=self.hostname,
                                        tls_context=self.tls_context, loop=self._loops.loop)
        self._connections.add(protocol)
        return protocol

    def stop(self) -> None:
        if self._loops is None:
            return
        server, loops = self._server, self._loops
        self._server = self._loops = None

        async def close() -> None:
            assert server is not None
            server.close()
            for protocol in list(self._connections):
                if protocol.transport is not None:
                    protocol.transport.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await server.wait_closed()

        loops.run(close())
        loops.close()
        self._connections.clear()

    def __enter__(self) -> Sink:
        return self if self._loops is not None else self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # --- what arrived

    def reset(self) -> None:
        """Forget what arrived and what a test set (between tests sharing the sink)."""
        with self._changed:
            self.arrivals.clear()
        self.defer, self.refuse, self.hang = set(), set(), set()
        self.hanging.clear()

    def wait_for(self, condition: Callable[[list[Arrival]], T], timeout: float = 10) -> T:
        """Block until ``condition(arrivals)`` is true, woken by each arrival; return its last value
        (false when ``timeout`` passed first)."""
        with self._changed:
            return self._changed.wait_for(lambda: condition(self.arrivals), timeout)

    def count(self, rcpt: str) -> int:
        """How many times ``rcpt`` was delivered."""
        return sum(arrival.rcpt_tos.count(rcpt) for arrival in list(self.arrivals))

    # --- aiosmtpd's handler hooks

    async def handle_EHLO(self, server: SMTP, session: Any, envelope: Any, hostname: str,
                          responses: list[str]) -> list[str]:
        session.host_name = hostname
        lines = [r for r in responses if self.eightbitmime or r != "250-8BITMIME"]
        if self.dsn:
            lines.insert(-1, "250-DSN")
        return self.ehlo(lines) if self.ehlo is not None else lines

    async def handle_RCPT(self, server: _SinkSMTP, session: Any, envelope: Any, address: str,
                          options: list[str]) -> str:
        local = _local_part(address)
        if self.refuse_all or local.startswith("reject"):
            return REJECTED
        if local.startswith("nosuch") or address in self.refuse:
            return f"550 5.1.1 <{address}>: {USER_UNKNOWN}"
        if local.startswith("shout"):
            return f"550 5.1.1 mailbox {address.upper()} does not exist"
        if local.startswith("defer") or address in self.defer:
            return f"451 4.2.0 <{address}>: mailbox busy"
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.append([*options, *server.dsn_rcpt])
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: SMTP, session: Any, envelope: Any) -> str:
        locals_ = [_local_part(r) for r in envelope.rcpt_tos]
        if any(local.startswith("slow") for local in locals_):
            await asyncio.sleep(SLOW_DATA_SECONDS)  # the behaviour under test: a slow destination
        if self.hang & set(envelope.rcpt_tos):
            self.hanging.set()
            await asyncio.get_running_loop().create_future()  # cancelled when the client goes away
        if any(local.startswith("drop") for local in locals_):
            assert server.transport is not None
            server.transport.close()  # the whole message arrived; the answer never leaves
            return "250 2.0.0 never sent"
        arrival = Arrival(str(envelope.mail_from), list(envelope.rcpt_tos),
                          bytes(envelope.original_content), list(envelope.mail_options),
                          [list(o) for o in envelope.rcpt_options], bool(envelope.smtp_utf8),
                          session.ssl is not None)
        with self._changed:
            self.arrivals.append(arrival)
            self._changed.notify_all()
        return "250 2.0.0 Ok: sunk"


def start_sink(host: str = "127.0.0.1", **options: Any) -> Sink:
    """A running :class:`Sink` on an ephemeral port; ``stop()`` it when done."""
    return Sink(host, **options).start()


class CommonPort:
    """Sinks on several loopback addresses listening on one port (a router has one port for
    every MX host), and ``refusing`` addresses where that port is held but not listening.

    The first sink binds port 0; the others bind the port it got.  When one of
    them cannot, everything is closed and another port is tried.
    """

    def __init__(self, sinks: Sequence[Sink], refusing: Iterable[str] = ()) -> None:
        self.sinks, self.refusing = list(sinks), list(refusing)
        self.port = 0
        self._held: list[socket.socket] = []

    def start(self) -> int:
        for _ in range(50):
            try:
                self.port = self.sinks[0].start().port
                for sink in self.sinks[1:]:
                    sink.start(self.port)
                for address in self.refusing:
                    held = socket.socket()
                    self._held.append(held)
                    held.bind((address, self.port))
                return self.port
            except OSError:
                self.stop()
        raise RuntimeError("no port free on all of " + ", ".join(
            [s.host for s in self.sinks] + self.refusing))

    def stop(self) -> None:
        for sink in self.sinks:
            sink.stop()
        for held in self._held:
            held.close()
        self._held.clear()

    def __enter__(self) -> int:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --------------------------------------------------------------------------- DNS


@contextmanager
def serve_zone(zone: str | BaseResolver, servfail: Iterable[str] = (),
               refused: Iterable[str] = ()) -> Iterator[LoopbackDNSServer]:
    """A DNS server on loopback answering from ``zone`` (zone-file text, or a resolver);
    names in ``servfail`` get SERVFAIL, names in ``refused`` REFUSED."""
    resolver = zone if isinstance(zone, BaseResolver) else ZoneResolver(zone, servfail, refused)
    with LoopbackDNSServer(resolver) as server:
        yield server


@pytest.fixture(scope="module")
def dns_zone(request: pytest.FixtureRequest) -> str | BaseResolver:
    """What a module's loopback DNS serves: its ``ZONE``, with its ``SERVFAIL`` and
    ``REFUSED`` names.

    A module whose zone is made at run time (keys generated by a fixture)
    overrides this fixture.
    """
    zone = getattr(request.module, "ZONE", None)
    if zone is None:
        raise pytest.UsageError(f"{request.module.__name__} has no ZONE for its loopback DNS")
    return ZoneResolver(zone, getattr(request.module, "SERVFAIL", ()),
                        getattr(request.module, "REFUSED", ()))


@pytest.fixture(scope="module")
def loopback_dns(dns_zone: str | BaseResolver) -> Iterator[LoopbackDNSServer]:
    """The module's DNS server on loopback (``port``, ``nameserver``, ``resolver.queries``)."""
    with serve_zone(dns_zone) as server:
        yield server


@pytest.fixture(scope="module")
def nameserver(loopback_dns: LoopbackDNSServer) -> str:
    """The module's loopback DNS server as "127.0.0.1:port"."""
    return loopback_dns.nameserver


__all__ = ["Arrival", "Clock", "CommonPort", "HOSTNAME", "LoopThread", "REJECTED", "RawClient",
           "SLOW_DATA_SECONDS", "ServeProcess", "ServerThread", "Sink", "TcpEntry", "USER_UNKNOWN",
           "async_wait_until", "dns_zone", "held_port", "listening_ports", "loopback_dns",
           "nameserver", "serve_zone", "start_sink", "tcp_table", "wait_for_listening_ports",
           "wait_for_log", "wait_until", "wait_until_consumed"]
