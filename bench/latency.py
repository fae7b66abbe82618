#!/usr/bin/env python3
"""Messages/second and DATA-reply latency through ``mailforward serve``, at several concurrencies.

    client (this script) -> mailforward serve (SQLite, SRS, pass-through) -> smtp-sink
    client (this script) -> smtp-sink                                      (the loopback ceiling)

Latency is measured from sending the final ``.`` to reading the reply: with
pass-through acknowledgement that includes the whole downstream transaction.
One SMTP session per message, as mail from the Internet arrives.  Everything
listens on 127.0.0.1; every process started here is stopped by PID at the end.

usage: bench/latency.py [--messages N] [--sizes 1024,102400,1048576] [--concurrency 1,10,50]
                        [--command "mailforward"]
Needs Postfix's smtp-sink (Debian package postfix) and ``mailforward`` on PATH
(or ``--command``, e.g. ``"python3 -m mailforward"`` with PYTHONPATH set to
another checkout's src/, to measure an older version in the same run).
Bigger messages get proportionally fewer messages, at least 50.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"nothing listening on 127.0.0.1:{port}")


async def reply(reader: asyncio.StreamReader) -> bytes:
    while True:
        line = await reader.readline()
        if len(line) < 4 or line[3:4] != b"-":
            return line


async def one_message(port: int, body: bytes) -> float | None:
    """One session; the seconds from final '.' to the reply, or None if not 250."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        await reply(reader)
        for command in (b"EHLO bench.test", b"MAIL FROM:<sender@ext.test>",
                        b"RCPT TO:<alice@example.org>", b"DATA"):
            writer.write(command + b"\r\n")
            await reply(reader)
        writer.write(body)
        start = time.perf_counter()
        writer.write(b".\r\n")
        answer = await reply(reader)
        elapsed = time.perf_counter() - start
        writer.write(b"QUIT\r\n")
        await reply(reader)
        return elapsed if answer.startswith(b"250") else None
    finally:
        writer.close()


async def load(port: int, messages: int, concurrency: int, body: bytes) -> tuple[float, list[float], int]:
    queue = iter(range(messages))
    latencies: list[float] = []
    failures = 0

    async def worker() -> None:
        nonlocal failures
        for _ in queue:
            result = await one_message(port, body)
            if result is None:
                failures += 1
            else:
                latencies.append(result)

    start = time.perf_counter()
    await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(concurrency))), timeout=600)
    return time.perf_counter() - start, latencies, failures


def make_body(size: int) -> bytes:
    header = b"From: sender@ext.test\r\nTo: alice@example.org\r\nSubject: bench\r\n\r\n"
    line = b"x" * 76 + b"\r\n"
    return header + line * max(1, (size - len(header)) // len(line))


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def start_servers(work: Path, command: list[str]) -> tuple[list[subprocess.Popen[bytes]], int, int]:
    sink_port, smtp_port = free_port(), free_port()
    user = ["-u", "postfix"] if os.geteuid() == 0 else []
    sink = subprocess.Popen(["smtp-sink", *user, f"127.0.0.1:{sink_port}", "1024"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    (work / "srs.secret").write_text(os.urandom(16).hex() + "\n")
    (work / "srs.secret").chmod(0o600)
    (work / "mailforward.toml").write_text(f"""
[server]
hostname = "mail.example.com"
listen = ["127.0.0.1:{smtp_port}"]
client_connection_count_limit = 1000
client_connection_rate_limit = 1000000
[database]
url = "sqlite:///{work}/mailforward.db"
[delivery]
relay_host = "[127.0.0.1]:{sink_port}"
spool_directory = "{work}/spool"
[auth]
verify = false
[srs]
domain = "example.org"
secret_file = "{work}/srs.secret"
""")
    for args in (["db", "init"], ["domain", "add", "example.org"],
                 ["alias", "add", "alice@example.org", "alice@sink.test"]):
        subprocess.run([*command, *args], cwd=work, check=True, stdout=subprocess.DEVNULL)
    serve = subprocess.Popen([*command, "serve"], cwd=work, stdout=subprocess.DEVNULL,
                             stderr=(work / "serve.log").open("wb"))
    wait_for_port(sink_port)
    wait_for_port(smtp_port)
    return [sink, serve], smtp_port, sink_port


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=1000, help="for 1 KB; fewer for larger")
    parser.add_argument("--sizes", default="1024")
    parser.add_argument("--concurrency", default="1,10,50")
    parser.add_argument("--command", default="mailforward")
    parser.add_argument("--no-direct", action="store_true", help="skip the loopback ceiling")
    args = parser.parse_args()
    if not shutil.which("smtp-sink"):
        sys.exit("smtp-sink missing: apt-get install postfix")
    with tempfile.TemporaryDirectory() as tmp:
        processes, smtp_port, sink_port = start_servers(Path(tmp), args.command.split())
        paths = [("mailforward", smtp_port)] + ([] if args.no_direct else [("direct-sink", sink_port)])
        try:
            print(f"{'path':<14}{'size':>9}{'conc':>5}{'msgs':>6}{'msg/s':>9}{'p50 ms':>9}"
                  f"{'p99 ms':>9}{'failed':>8}")
            for size in (int(s) for s in args.sizes.split(",")):
                body = make_body(size)
                messages = max(50, args.messages * 1024 // max(size, 1024))
                for concurrency in (int(c) for c in args.concurrency.split(",")):
                    for name, port in paths:
                        elapsed, latencies, failed = asyncio.run(
                            load(port, messages, concurrency, body))
                        print(f"{name:<14}{len(body):>9}{concurrency:>5}{messages:>6}"
                              f"{messages / elapsed:>9.0f}"
                              f"{percentile(latencies, 50) * 1000:>9.1f}"
                              f"{percentile(latencies, 99) * 1000:>9.1f}{failed:>8}", flush=True)
            print(f"mailforward peak RSS: {rss_mib(processes[1].pid):.0f} MiB")
        finally:
            for process in processes:
                process.terminate()
            for process in processes:
                process.wait(10)


if __name__ == "__main__":
    main()
