#!/usr/bin/env python3
"""Per-message cost of DKIM signing, ARC sealing and DKIM verification: dkimpy's pure Python vs OpenSSL.

Both columns run the same code -- ``DkimSigner.signature_headers``,
``ArcSealer.seal`` and the verifier's ``_verify_dkim`` (dkimpy canonicalizes
and builds the fields in both) -- the only difference being dkimpy's RSA step
and private-key parse: ``rsa_openssl.uninstall()`` puts dkimpy's own functions
back for the "dkimpy" column.  Verification answers key lookups from memory,
so no DNS time is included.  Figures are medians of ``--runs`` runs, in
milliseconds, on one thread.

The second table is a whole message as ``serve`` signs it: DKIM signature
and ARC seal built from one parse (``auth/signing.py``), against dkimpy
doing each end to end (what a message continuing an ARC chain still gets);
OpenSSL's RSA in both.

The third table is what the event loop feels: the longest gap between
1 ms timer ticks while ``--concurrency`` messages are signed and sealed at a
time in the auth CPU pool (``executors.CPU``), as ``MessageAuthenticator.outbound``
does.  With dkimpy's arithmetic the pool threads hold the GIL; OpenSSL releases it.

usage: bench/signing.py [--runs 50] [--bits 2048] [--sizes 4096,102400] [--concurrency 4]
Everything is in memory; nothing is sent and no DNS server is asked.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from mailforward.auth import rsa_openssl
from mailforward.auth.arc import ArcSealer
from mailforward.auth.dkim import DkimConfig, DkimKey, DkimSigner, generate_key
from mailforward.auth.executors import run_cpu
from mailforward.auth.pipeline import MessageAuthenticator
from mailforward.auth.verify import _verify_dkim
from mailforward.dns import make_sync_resolver

AUTHSERV_ID = "mx.forward.test"
CLIENT = "192.0.2.1"


def make_message(size: int) -> bytes:
    """A plain-text message of about ``size`` bytes with the usual header fields."""
    header = (b"Authentication-Results: mx.forward.test; spf=pass smtp.mailfrom=a@example.org;\r\n"
              b"\tdkim=none; dmarc=pass header.from=example.org; arc=none\r\n"
              b"Received: from client.example.org (client.example.org [192.0.2.1])\r\n"
              b"\tby mx.forward.test with ESMTPS id 4Xyz; Mon, 01 Jan 2024 00:00:00 +0000\r\n"
              b"From: Alice Example <alice@example.org>\r\n"
              b"To: Bob <bob@forward.test>\r\n"
              b"Subject: A message for the signing benchmark\r\n"
              b"Date: Mon, 01 Jan 2024 00:00:00 +0000\r\n"
              b"Message-ID: <bench@example.org>\r\n"
              b"MIME-Version: 1.0\r\n"
              b"Content-Type: text/plain; charset=us-ascii\r\n"
              b"\r\n")
    line = b"The quick brown fox jumps over the lazy dog; lorem ipsum dolor sit amet.\r\n"
    return header + line * max(1, -(-(size - len(header)) // len(line)))


def median_ms(function: Callable[[], object], runs: int) -> float:
    function()  # warm up (and fail early)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def operations(key: DkimKey, message: bytes) -> dict[str, Callable[[], object]]:
    signer = DkimSigner(DkimConfig(keys={key.name: key}, sign_forwarded_as=key))
    sealer = ArcSealer(key, AUTHSERV_ID)
    signed = signer.signature_headers(message, CLIENT) + message
    record = key.public_record().encode()
    resolver = make_sync_resolver(["127.0.0.1"], 1.0)  # never asked: answers are given
    answers: dict[bytes, bytes | Exception] = {f"{key.name}.".encode(): record}

    def sign() -> object:
        headers = signer.signature_headers(message, CLIENT)
        assert headers and not signer.signing_failures
        return headers

    def seal() -> object:
        headers = sealer.seal(signed)
        assert headers and not sealer.sealing_failures
        return headers

    def verify() -> object:
        verdicts = _verify_dkim(resolver, signed, answers)
        assert [v.result for v in verdicts] == ["pass"], verdicts
        return verdicts

    return {"DKIM sign": sign, "ARC seal": seal, "DKIM verify": verify}


def whole_message(key: DkimKey, message: bytes) -> dict[str, Callable[[], object]]:
    """DKIM signature + ARC seal of one message: dkimpy end to end (what a message
    continuing an ARC chain still gets) against what ``serve`` does (``auth/signing.py``:
    one parse, one canonicalization per field, our Authentication-Results as the AAR)."""
    signer = DkimSigner(DkimConfig(keys={key.name: key}, sign_forwarded_as=key))
    sealer = ArcSealer(key, AUTHSERV_ID)
    served = MessageAuthenticator(None, signer, sealer, authserv_id=AUTHSERV_ID)
    results = message.partition(b"\r\nReceived:")[0].partition(b":")[2] + b"\r\n"

    def dkimpy() -> object:
        signed = signer.signature_headers(message, CLIENT) + message
        return sealer.seal(signed) + signed

    def one_parse() -> object:
        return served._sign_and_seal(message, CLIENT, results)

    return {"dkimpy": dkimpy, "one parse": one_parse}


async def loop_stall_ms(key: DkimKey, message: bytes, messages: int, concurrency: int) -> float:
    """Longest gap between 1 ms ticks of the loop while messages are signed and sealed."""
    signer = DkimSigner(DkimConfig(keys={key.name: key}, sign_forwarded_as=key))
    sealer = ArcSealer(key, AUTHSERV_ID)

    def sign_and_seal() -> bytes:
        signed = signer.signature_headers(message, CLIENT) + message
        return sealer.seal(signed) + signed

    gaps: list[float] = []
    done = asyncio.Event()

    async def ticker() -> None:
        last = time.perf_counter()
        while not done.is_set():
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    async def worker(count: int) -> None:
        for _ in range(count):
            await run_cpu(sign_and_seal)

    ticking = asyncio.create_task(ticker())
    await asyncio.sleep(0.01)
    await asyncio.gather(*(worker(messages // concurrency) for _ in range(concurrency)))
    done.set()
    await ticking
    return max(gaps) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--bits", type=int, default=2048)
    parser.add_argument("--sizes", default="4096,102400")
    parser.add_argument("--concurrency", type=int, default=4)
    args = parser.parse_args()
    sizes = [int(size) for size in args.sizes.split(",")]

    with tempfile.TemporaryDirectory() as directory:
        key = generate_key("example.org", "bench", Path(directory), bits=args.bits)
    print(f"RSA {args.bits}-bit key; medians of {args.runs} runs, ms per message, one thread")
    print(f"{'operation':<12} {'size':>8} {'dkimpy':>9} {'OpenSSL':>9} {'speed-up':>9}")
    for size in sizes:
        message = make_message(size)
        for name, function in operations(key, message).items():
            rsa_openssl.uninstall()
            try:
                pure = median_ms(function, args.runs)
            finally:
                rsa_openssl.install()
            ours = median_ms(function, args.runs)
            print(f"{name:<12} {size // 1024:>5} KB {pure:>9.2f} {ours:>9.2f} "
                  f"{pure / ours:>8.1f}x")

    print("\nDKIM sign + ARC seal of one message, OpenSSL RSA in both, ms")
    print(f"{'size':>8} {'dkimpy':>9} {'one parse':>10} {'speed-up':>9}")
    for size in sizes:
        ways = whole_message(key, make_message(size))
        pure, ours = (median_ms(ways[name], args.runs) for name in ("dkimpy", "one parse"))
        print(f"{size // 1024:>5} KB {pure:>9.2f} {ours:>10.2f} {pure / ours:>8.1f}x")

    print(f"\nevent loop: longest gap between 1 ms ticks while signing + sealing "
          f"{4 * args.concurrency} messages, {args.concurrency} at a time in the auth CPU pool")
    print(f"{'size':>8} {'dkimpy':>9} {'OpenSSL':>9}")
    for size in sizes:
        message = make_message(size)
        rsa_openssl.uninstall()
        try:
            pure = asyncio.run(loop_stall_ms(key, message, 4 * args.concurrency,
                                             args.concurrency))
        finally:
            rsa_openssl.install()
        ours = asyncio.run(loop_stall_ms(key, message, 4 * args.concurrency, args.concurrency))
        print(f"{size // 1024:>5} KB {pure:>9.1f} {ours:>9.1f}")


if __name__ == "__main__":
    main()
