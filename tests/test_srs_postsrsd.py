"""Interop with the real PostSRSd 1.x (Debian package ``postsrsd``).

Each configuration runs one PostSRSd on loopback next to our own tcp_table
servers with the same secrets and options; the tests ask both the same
questions and compare the raw reply lines byte for byte.  Skipped only when
postsrsd is missing and CI is unset; in CI a missing postsrsd is an error.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailforward.srs import SrsRewriter
from mailforward.srs_tcp import reply_line, start_srs_tcp_servers, url_encode

from smtp_harness import Clock, wait_for_listening_ports

_SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin"])
POSTSRSD = shutil.which("postsrsd", path=_SEARCH_PATH)
if POSTSRSD is None:
    if os.environ.get("CI"):
        pytest.fail("postsrsd is required in CI (apt-get install -y postsrsd) but is not installed",
                    pytrace=False)
    pytest.skip("postsrsd is not installed (apt-get install -y postsrsd) and CI is unset",
                allow_module_level=True)

DOMAIN = "example.org"
NEW_SECRET = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
OLD_SECRET = "old mailforward test secret"
EXCLUDES = ("excluded.test", ".subs-excluded.test")
FORWARD, REVERSE = 0, 1


@dataclass(frozen=True)
class Pair:
    """One PostSRSd and our servers, configured alike."""

    name: str
    rewriter: SrsRewriter
    postsrsd: tuple[int, int]  # (forward port, reverse port)
    ours: tuple[int, int]


# name: (separator, hash_length, hash_min)
CONFIGS = {"eq": ("=", 4, 4), "plus": ("+", 6, 3), "minus": ("-", 4, 4)}


def postsrsd_command(secret_file: Path, separator: str, hash_length: int, hash_min: int,
                     forward_port: int, reverse_port: int) -> list[str]:
    """Foreground, loopback, no -u/-c (none needed for ports above 1024)."""
    assert POSTSRSD is not None
    return [POSTSRSD, f"-s{secret_file}", f"-d{DOMAIN}", f"-a{separator}", f"-n{hash_length}",
            f"-N{hash_min}", "-l127.0.0.1", f"-f{forward_port}", f"-r{reverse_port}",
            f"-X{','.join(EXCLUDES)}"]


@pytest.fixture(scope="session")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Pair]]:
    assert POSTSRSD is not None
    version = subprocess.run([POSTSRSD, "-v"], capture_output=True, text=True, timeout=10).stdout
    if not version.startswith("1."):
        raise RuntimeError(f"these tests target PostSRSd 1.x, found {version.strip()!r}")
    tmp = tmp_path_factory.mktemp("postsrsd")
    secret_file = tmp / "secret"
    secret_file.write_text(f"{NEW_SECRET}\n\n{OLD_SECRET}\n")
    secret_file.chmod(0o600)

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="srs-tcp-test", daemon=True)
    thread.start()
    processes: list[subprocess.Popen[bytes]] = []
    servers: list[asyncio.Server] = []
    result: dict[str, Pair] = {}
    try:
        for name, (separator, hash_length, hash_min) in CONFIGS.items():
            log = tmp / f"{name}.log"
            with log.open("wb") as out:  # port 0: PostSRSd binds ephemeral ports ...
                proc = subprocess.Popen(
                    postsrsd_command(secret_file, separator, hash_length, hash_min, 0, 0),
                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
            processes.append(proc)
            try:  # ... and logs none of them: they come from /proc, forward first
                forward, reverse = wait_for_listening_ports(proc, 2, timeout=10)
            except (RuntimeError, TimeoutError) as e:
                raise RuntimeError(f"postsrsd did not listen: {e}: {log.read_text()}") from None
            ports = (forward, reverse)
            rewriter = SrsRewriter(DOMAIN, [NEW_SECRET, OLD_SECRET], separator=separator,
                                   hash_length=hash_length, hash_min=hash_min,
                                   exclude_domains=EXCLUDES)
            ours = asyncio.run_coroutine_threadsafe(
                start_srs_tcp_servers(rewriter, "127.0.0.1", 0, 0), loop).result(10)
            servers.extend(ours)
            result[name] = Pair(name, rewriter, ports,
                                (ours[0].sockets[0].getsockname()[1], ours[1].sockets[0].getsockname()[1]))
        yield result
    finally:
        for proc in processes:
            proc.kill()  # by PID (Popen.kill signals proc.pid)
            proc.wait(10)

        async def close() -> None:
            for server in servers:
                server.close()
                await server.wait_closed()

        asyncio.run_coroutine_threadsafe(close(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def query(port: int, data: bytes) -> bytes:
    """Send ``data``, half-close, and return everything the server says until it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        conn.sendall(data)
        conn.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := conn.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def same_day(ask: Callable[[], tuple[bytes, bytes]]) -> tuple[bytes, bytes]:
    """Run ``ask`` so that both answers come from the same UTC day (stamps change at 00:00)."""
    for _ in range(3):
        day = time.time() // 86400
        answers = ask()
        if time.time() // 86400 == day:
            return answers
    raise AssertionError("the day changed three times in a row")


def ask_both(pair: Pair, direction: int, data: bytes) -> tuple[bytes, bytes]:
    return same_day(lambda: (query(pair.postsrsd[direction], data), query(pair.ours[direction], data)))


def get(key: bytes) -> bytes:
    return b"get " + key + b"\n"


@pytest.fixture(params=list(CONFIGS))
def pair(request: pytest.FixtureRequest, pairs: dict[str, Pair]) -> Pair:
    return pairs[str(request.param)]


SENDERS = [
    "alice@sender.test",
    "Alice.Smith+tag@Sender.TEST",
    "x=y@sender.test",
    "SRS0=HHHH=TT=orig.test=bob@forwarder1.test",
    "srs0+opaque@forwarder1.test",
    "SRS1=XYZW=first.test==HHHH=TT=orig.test=bob@forwarder2.test",
    "user@example.org",
    "user@EXAMPLE.ORG",
    "user@sub.example.org",
    "user@excluded.test",
    "user@sub.excluded.test",
    "user@subs-excluded.test",
    "user@deep.subs-excluded.test",
    "no-at-sign",
    "a@b@c.test",
    "ünïcode@bücher.test",
    "SRS1=abc@x.test",
]


@pytest.mark.parametrize("sender", SENDERS)
def test_forward_matches_postsrsd_byte_for_byte(pair: Pair, sender: str) -> None:
    key = sender.encode()
    theirs, expected = same_day(lambda: (query(pair.postsrsd[FORWARD], get(url_encode(key))),
                                         reply_line(pair.rewriter.forward_bytes, key)))
    assert theirs == expected
    if theirs.startswith(b"200 "):
        assert theirs == b"200 " + url_encode(pair.rewriter.forward(sender).encode()) + b"\n"


def test_own_domain_is_200_unchanged_and_excluded_is_500_on_both(pairs: dict[str, Pair]) -> None:
    theirs, ours = ask_both(pairs["eq"], FORWARD, get(b"user@EXAMPLE.ORG") + get(b"user@excluded.test"))
    assert theirs == ours == b"200 user@EXAMPLE.ORG\n500 Domain excluded py policy\n"


@pytest.mark.parametrize("sender", ["alice@sender.test", "Alice.Smith+tag@Sender.TEST",
                                    "SRS0=HHHH=TT=orig.test=bob@forwarder1.test",
                                    "SRS1=XYZW=first.test==HHHH=TT=orig.test=bob@forwarder2.test",
                                    "ünïcode@bücher.test"])
def test_postsrsd_reverses_our_addresses(pair: Pair, sender: str) -> None:
    ours = pair.rewriter.forward(sender).encode()
    expected_original = pair.rewriter.reverse(ours.decode())
    reply = query(pair.postsrsd[REVERSE], get(url_encode(ours)))
    assert reply == b"200 " + url_encode(expected_original.encode()) + b"\n"


@pytest.mark.parametrize("sender", ["alice@sender.test", "srs0+opaque@forwarder1.test",
                                    "SRS1=XYZW=first.test==opaque@forwarder2.test", "a=b@c.test"])
def test_we_reverse_postsrsd_addresses(pair: Pair, sender: str) -> None:
    reply = query(pair.postsrsd[FORWARD], get(sender.encode()))
    assert reply.startswith(b"200 ")
    theirs = reply[4:-1].decode()
    original = pair.rewriter.reverse(theirs)
    if sender.upper().startswith("SRS"):
        assert original.startswith("SRS0")
    else:
        assert original == sender
    assert query(pair.ours[REVERSE], get(theirs.encode())) == query(pair.postsrsd[REVERSE], get(theirs.encode()))


def test_postsrsd_accepts_our_addresses_signed_with_the_old_secret(pair: Pair) -> None:
    separator, hash_length, hash_min = CONFIGS[pair.name]
    old_only = SrsRewriter(DOMAIN, [OLD_SECRET], separator=separator, hash_length=hash_length,
                           hash_min=hash_min)
    address = old_only.forward("alice@sender.test").encode()
    assert query(pair.postsrsd[REVERSE], get(address)) == b"200 alice@sender.test\n"
    assert query(pair.ours[REVERSE], get(address)) == b"200 alice@sender.test\n"


@pytest.mark.parametrize("days_ago", [0, 1, 21, 22, 23, -1, -5, 1024, 1024 + 22, 500])
def test_expiry_agrees_with_postsrsd(pair: Pair, days_ago: int) -> None:
    def ask() -> tuple[bytes, bytes]:
        separator, hash_length, hash_min = CONFIGS[pair.name]
        then = time.time() - days_ago * 86400
        minted = SrsRewriter(DOMAIN, [NEW_SECRET], separator=separator, hash_length=hash_length,
                             hash_min=hash_min, clock=Clock(then)).forward("alice@sender.test")
        data = get(minted.encode())
        return query(pair.postsrsd[REVERSE], data), query(pair.ours[REVERSE], data)

    theirs, ours = same_day(ask)
    assert theirs == ours
    assert theirs == (b"200 alice@sender.test\n" if days_ago % 1024 <= 21 and days_ago >= 0
                      else b"500 Time stamp out of date.\n")


def _mutations(address: bytes, hash_length: int) -> list[bytes]:
    tag, rest = address[:5], address[5:]
    digest, tail = rest.split(b"=", 1)
    return [
        address,
        address.swapcase(),
        address.lower(),
        tag + digest[:3] + b"=" + tail,
        tag + digest[:2] + b"=" + tail,
        tag + digest + b"Zz9=" + tail,
        tag + digest[:-1] + (b"A" if digest[-1:] != b"A" else b"B") + b"=" + tail,
        b"SRS0-" + rest if tag.startswith(b"SRS0") else b"SRS1+" + rest,
        tag + digest + b"=" + tail.replace(b"alice", b"mallory"),
        tag + b"=" + tail,
    ]


@pytest.mark.parametrize("sender", [b"alice@sender.test", b"SRS0=opaque@forwarder1.test"])
def test_hash_length_min_and_case_rules_agree_with_postsrsd(pair: Pair, sender: bytes) -> None:
    _, hash_length, _ = CONFIGS[pair.name]
    address = same_day(lambda: (query(pair.postsrsd[FORWARD], get(sender)), b""))[0][4:-1]
    for mutated in _mutations(address, hash_length):
        theirs, ours = ask_both(pair, REVERSE, get(mutated))
        assert theirs == ours, mutated


TCP_REQUESTS = [
    get(b"alice@sender.test"),
    get(b"a%20b@sender.test"),
    get(b"a%25b@sender.test"),
    get(b"\xc3\xa9t\xc3\xa9@sender.test"),
    get(b"%01%7f@sender.test"),
    get(b"user@excluded.test"),
    get(b"user@EXAMPLE.org"),
    get(b"no-at-sign"),
    get(b"test@example.org"),
    get(b"SRS0=abcd=2W=x.test=u@example.org"),
    get(b"SRS0=@example.org"),
    get(b"SRS0=abcd@example.org"),
    get(b"SRS0=abcd=2W@example.org"),
    get(b"SRS0=abcd=2W=x.test@example.org"),
    get(b"SRS1=abcd@example.org"),
    get(b"SRS0=abcd=!!=x.test=u@example.org"),
    get(b"SRS0"),
    get(b"%00"),
    b"get \n",
    b"get\n",
    b"put alice@sender.test\n",
    b"GET alice@sender.test\n",
    b"get\talice@sender.test\n",
    b"get alice%4@sender.test\n",
    b"  get alice@sender.test\r\n",
    b"get  alice@sender.test\n",
    b"get alice@sender.test",
    b"get a@b.test\nget c@d.test\nput e@f.test\nget g@h.test\n",
    b"get a@b.test\x00junk\nget c@d.test\n",
    b"get " + b"a" * 1000 + b"@x.test\n",
    b"get " + b"a" * 1030 + b"@x.test\n",
    b"get " + b"%01" * 330 + b"@x.test\n",
    b"\n",
    b"",
]


@pytest.mark.parametrize("data", TCP_REQUESTS, ids=lambda d: repr(d[:40]))
@pytest.mark.parametrize("direction", [FORWARD, REVERSE], ids=["forward", "reverse"])
def test_tcp_reply_lines_match_postsrsd(pair: Pair, direction: int, data: bytes) -> None:
    theirs, ours = ask_both(pair, direction, data)
    assert theirs == ours


ATOMS = [b"SRS0", b"SRS1", b"srs0", b"Srs1", b"SRS", b"=", b"=", b"=", b"+", b"-", b"@", b"@", b"a",
         b"B", b"x.test", b"example.org", b"EXAMPLE.ORG", b"excluded.test", b".subs-excluded.test",
         b"%", b"%41", b"%00", b"%2", b" ", b"\r", b"\t", b"\xc3\xa9", b"\xff", b"2W", b"jn", b"AAAA",
         b"get ", b"\x00"]
PREFIXES = [b"get ", b"get ", b"get ", b" get ", b"get", b"put ", b"get  "]
REQUESTS = st.builds(
    lambda prefix, parts, end: prefix + b"".join(parts) + end,
    st.sampled_from(PREFIXES),
    st.lists(st.sampled_from(ATOMS) | st.binary(max_size=3).filter(lambda b: b"\n" not in b),
             max_size=10),
    st.sampled_from([b"\n", b"\r\n", b""]),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=REQUESTS)
def test_arbitrary_requests_get_the_same_replies_as_postsrsd(pairs: dict[str, Pair], data: bytes) -> None:
    for pair in (pairs["eq"], pairs["plus"]):
        for direction in (FORWARD, REVERSE):
            theirs, ours = ask_both(pair, direction, data)
            assert theirs == ours, (pair.name, direction)


SENDER_LOCALS = st.lists(st.sampled_from([b"a", b"B", b"=", b"+", b".", b"SRS0=", b"SRS1=", b"x", b"\xc3\xa9"]),
                         min_size=1, max_size=6).map(b"".join)
SENDER_HOSTS = st.sampled_from([b"x.test", b"Other.Test", b"sub.subs-excluded.test", b"third.test==a"])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(local=SENDER_LOCALS, host=SENDER_HOSTS, mutation=st.integers(0, 9))
def test_postsrsd_addresses_mangled_in_transit_get_the_same_replies(
        pairs: dict[str, Pair], local: bytes, host: bytes, mutation: int) -> None:
    pair = pairs["plus"]
    reply = query(pair.postsrsd[FORWARD], get(url_encode(local + b"@" + host)))
    if not reply.startswith(b"200 SRS"):
        return
    address = reply[4:-1]
    mutated = _mutations(address, 6)[mutation]
    theirs, ours = ask_both(pair, REVERSE, get(mutated))
    assert theirs == ours
