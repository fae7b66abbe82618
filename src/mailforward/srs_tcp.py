"""Postfix tcp_table servers for SRS, answering exactly as PostSRSd 1.x does.

Why mimic PostSRSd down to its quirks: an existing Postfix configured with
``sender_canonical_maps = tcp:127.0.0.1:10001`` and
``recipient_canonical_maps = tcp:127.0.0.1:10002`` must behave the same when
PostSRSd is replaced by this server, including its 500 replies (Postfix
treats every 500 as "not found" and keeps the address).

Protocol (per line): ``get SP key NL``, the key %XX-encoded.  Replies are
``200 <url-encoded result>`` or ``500 <reason>``; PostSRSd never answers 400.
A request that is not ``get <key>``, a broken %-escape or a line of 1023
bytes or more gets ``500 Invalid request`` and the connection is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Callable

from .srs import SrsError, SrsRewriter

__all__ = ["parse_request", "reply_line", "start_srs_tcp_servers", "url_encode"]

logger = logging.getLogger(__name__)

LINE_MAX = 1023
"""PostSRSd reads with ``fgets(buf, 1024)`` and refuses a line that fills it."""

INVALID_REQUEST = b"500 Invalid request\n"
_HEX = b"0123456789abcdefABCDEF"
_TOKEN_DELIMITERS = b" \r\n"


def _url_decode(encoded: bytes) -> bytes | None:
    """%XX-decode; None for a '%' without two hex digits (PostSRSd: Invalid request)."""
    out = bytearray()
    i = 0
    while i < len(encoded):
        if encoded[i] == 0x25:  # '%'
            pair = encoded[i + 1:i + 3]
            if len(pair) != 2 or pair[0] not in _HEX or pair[1] not in _HEX:
                return None
            out.append(int(pair, 16))
            i += 3
        else:
            out.append(encoded[i])
            i += 1
    return bytes(out)


def url_encode(value: bytes) -> bytes:
    """PostSRSd's url_encode: %xx (lower-case) for '%', non-graphic and non-ASCII bytes.

    Like PostSRSd, the result is cut to fit its 1024-byte buffer.
    """
    out = bytearray()
    room = 1024
    for byte in value:
        room -= 1
        if room == 0:
            break
        if byte == 0x25 or not 0x21 <= byte <= 0x7E:
            if room <= 2:
                break
            out += b"%%%02x" % byte
            room -= 2
        else:
            out.append(byte)
    return bytes(out)


def parse_request(line: bytes) -> bytes | None:
    """The decoded key of one request line, or None if PostSRSd calls it invalid.

    Follows PostSRSd's C parsing: the line ends at a NUL; ``strtok`` on
    space/CR/LF must yield exactly ``get``; the key is the rest up to CR/LF
    (leading CR/LF skipped, spaces kept); the decoded key ends at a NUL.
    """
    line = line.split(b"\0", 1)[0]
    if len(line) >= LINE_MAX:
        return None
    start = 0
    while start < len(line) and line[start] in _TOKEN_DELIMITERS:
        start += 1
    end = start
    while end < len(line) and line[end] not in _TOKEN_DELIMITERS:
        end += 1
    if line[start:end] != b"get":
        return None
    rest = line[end + 1:].lstrip(b"\r\n")
    for stop, byte in enumerate(rest):
        if byte in b"\r\n":
            rest = rest[:stop]
            break
    if not rest:
        return None
    key = _url_decode(rest)
    if key is None:
        return None
    return key.split(b"\0", 1)[0]


def reply_line(lookup: Callable[[bytes], bytes], key: bytes) -> bytes:
    """The reply to one valid request: ``200 <encoded>`` or ``500 <reason>``.

    Each answer is logged as PostSRSd logs it (addresses only, never content).
    """
    name = getattr(lookup, "__name__", "lookup").removesuffix("_bytes")
    shown = key.decode("utf-8", "backslashreplace")
    try:
        result = lookup(key)
    except SrsError as e:
        logger.info("srs_%s: <%s> not rewritten: %s", name, shown, e.reason)
        return b"500 " + e.reason.encode("utf-8", "replace") + b"\n"
    logger.info("srs_%s: <%s> rewritten as <%s>", name, shown,
                result.decode("utf-8", "backslashreplace"))
    return b"200 " + url_encode(result) + b"\n"


async def _read_line(reader: asyncio.StreamReader, buffer: bytearray) -> bytes | None:
    """Next line like fgets(buf, 1024): up to LF, 1023 bytes, or EOF; None at EOF."""
    while True:
        newline = buffer.find(b"\n", 0, LINE_MAX)
        if newline >= 0:
            cut = newline + 1
        elif len(buffer) >= LINE_MAX:
            cut = LINE_MAX
        else:
            chunk = await reader.read(4096)
            if chunk:
                buffer += chunk
                continue
            if not buffer:
                return None
            cut = len(buffer)
        line = bytes(buffer[:cut])
        del buffer[:cut]
        return line


async def _serve(lookup: Callable[[bytes], bytes], idle_timeout: float,
                 reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    buffer = bytearray()
    try:
        while True:
            line = await asyncio.wait_for(_read_line(reader, buffer), idle_timeout)
            if line is None:
                break
            key = parse_request(line)
            if key is None:
                writer.write(INVALID_REQUEST)
                await writer.drain()
                break  # PostSRSd closes the connection after an invalid request
            writer.write(reply_line(lookup, key))
            await writer.drain()
    except (TimeoutError, ConnectionError):
        pass
    except Exception:  # a bug: log it, drop this connection, keep serving others
        logger.exception("SRS tcp_table connection failed")
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def start_srs_tcp_servers(
    rewriter: SrsRewriter,
    host: str = "127.0.0.1",
    forward_port: int = 10001,
    reverse_port: int = 10002,
    *,
    idle_timeout: float = 1800.0,
) -> list[asyncio.Server]:
    """Listen for forward (sender) and reverse (bounce recipient) lookups.

    Returns ``[forward_server, reverse_server]``, already serving.  Bind to
    loopback: the forward table signs whatever it is asked, so exposing it
    would let anyone mint return paths through us.  ``idle_timeout`` is
    PostSRSd's ``-t`` (default 1800 s).
    """
    forward = await asyncio.start_server(
        functools.partial(_serve, rewriter.forward_bytes, idle_timeout), host, forward_port)
    try:
        reverse = await asyncio.start_server(
            functools.partial(_serve, rewriter.reverse_bytes, idle_timeout), host, reverse_port)
    except BaseException:
        forward.close()
        await forward.wait_closed()
        raise
    for kind, server in (("forward", forward), ("reverse", reverse)):
        for sock in server.sockets:
            address = sock.getsockname()
            logger.info("listening for %s lookups on %s:%d", kind, address[0], address[1])
    return [forward, reverse]
