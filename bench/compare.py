#!/usr/bin/env python3
"""mailforward against the reference stack (Postfix + PostSRSd + MariaDB), same run, same sink kind.

    smtp-source -> Postfix 127.0.0.1:25 (../shared/peer/start.sh)  -> smtp-sink :2526
    smtp-source -> mailforward serve (the same MariaDB maildb)      -> smtp-sink (its own port)

Each load point runs the two systems alternately ``--runs`` times; a run is
timed end to end, from the first connection until the sink has counted every
message (a Postfix 250 means queued, ours means delivered: only the sink's
count compares like with like).  Printed: medians, the ratio
mailforward/reference per point, the DATA-reply p50/p99 at 1 KB x 10,
mailforward's peak RSS, and the sink counts (no loss).

The signed point turns on inbound verification (SPF/DKIM/DMARC/ARC against a
loopback DNS server serving the sender's records), DKIM signing and ARC
sealing on mailforward and compares it with the reference *without* them.

usage: bench/compare.py [--runs 3] [--scale 1.0] [--points 1k1,1k10,1k50,100k20,1m5,signed]
Needs: postfix postfix-mysql postsrsd (Debian), MariaDB running, root (the
reference's start.sh), and mailforward installed.  Everything listens on
127.0.0.1; every process started here is stopped by PID at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from latency import load as latency_load  # noqa: E402
from latency import make_body, percentile, rss_mib  # noqa: E402

PEER = Path(__file__).resolve().parents[2] / "shared" / "peer"
PEER_SINK_PORT = 2526
PEER_PORT = 25


@dataclass(frozen=True)
class Point:
    name: str
    size: int
    sessions: int
    messages: int
    signed: bool = False


POINTS = {
    "1k1": Point("1 KB x 1", 1024, 1, 1000),
    "1k10": Point("1 KB x 10", 1024, 10, 3000),
    "1k50": Point("1 KB x 50", 1024, 50, 3000),
    "100k20": Point("100 KB x 20", 102400, 20, 1000),
    "1m5": Point("1 MB x 5", 1048576, 5, 100),
    "signed": Point("1 KB x 10, verify+sign+seal", 1024, 10, 2000, signed=True),
}


class CountingSink:
    """smtp-sink -c: its running counter of received messages, read from its output file."""

    def __init__(self, output: Path, process: subprocess.Popen[bytes] | None = None) -> None:
        self.output = output
        self.process = process

    @classmethod
    def start(cls, port: int, work: Path) -> CountingSink:
        output = work / f"sink-{port}.out"
        user = ["-u", "postfix"] if os.geteuid() == 0 else []
        process = subprocess.Popen(["smtp-sink", "-c", *user, f"127.0.0.1:{port}", "1024"],
                                   stdout=output.open("wb"), stderr=subprocess.DEVNULL)
        return cls(output, process)

    def count(self) -> int:
        if not self.output.exists():
            return 0
        counts = re.findall(rb"mesg=(\d+)", self.output.read_bytes()[-200:])
        return int(counts[-1]) if counts else 0

    def wait_for(self, total: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.count() >= total:
                return True
            time.sleep(0.02)
        return False

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)


def smtp_source(port: int, point: Point, messages: int) -> None:
    subprocess.run(["smtp-source", "-s", str(point.sessions), "-m", str(messages),
                    "-l", str(point.size), "-f", "sender@ext.test", "-t", "alice@example.org",
                    f"127.0.0.1:{port}"], check=True, stdout=subprocess.DEVNULL)


def timed_run(port: int, sink: CountingSink, point: Point, messages: int) -> tuple[float, int]:
    """Messages per second end to end, and how many the sink got in this run."""
    before = sink.count()
    start = time.monotonic()
    smtp_source(port, point, messages)
    complete = sink.wait_for(before + messages, timeout=600)
    elapsed = time.monotonic() - start
    received = sink.count() - before
    if not complete:
        print(f"  !! only {received} of {messages} reached the sink", flush=True)
    return messages / elapsed, received


# ---------------------------------------------------------------- the two systems


def start_reference(work: Path) -> CountingSink:
    wrapper = work / "peer-sink.sh"
    wrapper.write_text(f"#!/bin/sh\nexec smtp-sink -c -u postfix 127.0.0.1:{PEER_SINK_PORT} 1024 "
                       f"> {work}/sink-{PEER_SINK_PORT}.out 2>/dev/null\n")
    wrapper.chmod(0o755)
    subprocess.run(["bash", str(PEER / "stop.sh")], check=False, capture_output=True)
    env = {**os.environ, "PEER_BENCH": "1", "SINK_CMD": str(wrapper)}
    subprocess.run(["bash", str(PEER / "start.sh")], env=env, check=True, capture_output=True)
    return CountingSink(work / f"sink-{PEER_SINK_PORT}.out")  # started and stopped by the peer scripts


def stop_reference() -> None:
    subprocess.run(["bash", str(PEER / "stop.sh")], check=False, capture_output=True)


def write_mailforward_config(work: Path, sink_port: int, signed: bool, dns_port: int) -> Path:
    (work / "srs.secret").write_text(os.urandom(16).hex() + "\n")
    (work / "srs.secret").chmod(0o600)
    config = work / ("signed.toml" if signed else "plain.toml")
    text = f"""
[server]
hostname = "mail.example.com"
listen = ["127.0.0.1:0"]
client_limit_exceptions = ["127.0.0.1"]  # as the reference: smtpd_client_event_limit_exceptions
[database]
url = "mysql://maildb:peer-pass@127.0.0.1:3306/maildb"
pool_size = 60
[delivery]
relay_host = "[127.0.0.1]:{sink_port}"
spool_directory = "{work}/spool-{'signed' if signed else 'plain'}"
nameservers = ["127.0.0.1:{dns_port}"]
[srs]
domain = "example.org"
secret_file = "{work}/srs.secret"
"""
    if signed:
        text += f"""
[auth]
verify = true
[dkim]
keys = ["fwd._domainkey.fwd.test fwd.test:fwd:{work}/fwd.private"]
sign_forwarded_as = "fwd.test"
[arc]
domain = "fwd.test"
selector = "fwd"
"""
    else:
        text += "[auth]\nverify = false\n"
    config.write_text(text)
    return config


def start_mailforward(config: Path, work: Path) -> tuple[subprocess.Popen[bytes], int]:
    log = work / f"{config.stem}.log"
    process = subprocess.Popen([sys.executable, "-m", "mailforward", "--config", str(config), "serve"],
                               stdout=subprocess.DEVNULL, stderr=log.open("wb"))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        found = re.search(r"listening on 127\.0\.0\.1:(\d+)", log.read_text(errors="replace"))
        if found:
            return process, int(found.group(1))
        if process.poll() is not None:
            break
        time.sleep(0.05)
    raise SystemExit(f"mailforward did not start: {log.read_text(errors='replace')[-2000:]}")


def peak_rss(process: subprocess.Popen[bytes]) -> float:
    """Peak RSS of the server and its worker processes, in MiB."""
    pids = [process.pid]
    children = Path(f"/proc/{process.pid}/task/{process.pid}/children")
    if children.exists():
        pids += [int(p) for p in children.read_text().split()]
    return sum(rss_mib(pid) for pid in pids)


# ---------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--scale", type=float, default=1.0, help="multiply message counts")
    parser.add_argument("--points", default=",".join(POINTS))
    args = parser.parse_args()
    for tool in ("smtp-source", "smtp-sink", "postfix", "postsrsd"):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            sys.exit(f"{tool} missing: apt-get install postfix postfix-mysql postsrsd")
    points = [POINTS[name] for name in args.points.split(",")]

    from mailforward.auth.dkim import generate_key

    from dns_server import LoopbackDNSServer, ZoneResolver

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        key = generate_key("fwd.test", "fwd", work, bits=2048)  # work/fwd.private
        zone = ('ext.test. 300 IN TXT "v=spf1 ip4:127.0.0.1 -all"\n'
                '_dmarc.ext.test. 300 IN TXT "v=DMARC1; p=none"\n' + key.zone_lines() + "\n")
        with LoopbackDNSServer(ZoneResolver(zone)) as dns:
            dns_port = int(dns.nameserver.rpartition(":")[2])
            peer_sink = start_reference(work)
            mf_sink = CountingSink.start(2527, work)
            servers = {signed: start_mailforward(
                write_mailforward_config(work, 2527, signed, dns_port), work)
                for signed in {p.signed for p in points} | {False}}
            try:
                run_points(points, args, peer_sink, mf_sink, servers)
                print_latency(servers[False][1])
                for signed, (process, _) in servers.items():
                    print(f"mailforward{' (signing)' if signed else ''} peak RSS: "
                          f"{peak_rss(process):.0f} MiB")
            finally:
                for process, _ in servers.values():
                    process.terminate()
                for process, _ in servers.values():
                    process.wait(30)
                mf_sink.stop()
                stop_reference()


def run_points(points: list[Point], args: argparse.Namespace, peer_sink: CountingSink,
               mf_sink: CountingSink, servers: dict[bool, tuple[subprocess.Popen[bytes], int]]) -> None:
    print(f"{'load':<30}{'reference':>11}{'mailforward':>13}{'ratio':>8}{'sink ref/mf':>14}")
    for point in points:
        messages = max(20, int(point.messages * args.scale))
        ref_rates, mf_rates, ref_got, mf_got = [], [], 0, 0
        for _ in range(args.runs):
            rate, got = timed_run(PEER_PORT, peer_sink, point, messages)
            ref_rates.append(rate)
            ref_got += got
            rate, got = timed_run(servers[point.signed][1], mf_sink, point, messages)
            mf_rates.append(rate)
            mf_got += got
        ref, mf = statistics.median(ref_rates), statistics.median(mf_rates)
        print(f"{point.name:<30}{ref:>9.0f}/s{mf:>11.0f}/s{mf / ref:>7.2f}x"
              f"{ref_got:>7}/{mf_got:<6}", flush=True)


def print_latency(mf_port: int) -> None:
    """DATA-reply p50/p99 at 10 sessions, 1 KB, both systems (ours includes delivery)."""
    body = make_body(1024)
    for name, port in (("reference", PEER_PORT), ("mailforward", mf_port)):
        _, latencies, failed = asyncio.run(latency_load(port, 1000, 10, body))
        print(f"DATA-reply latency 1 KB x 10, {name}: p50 {percentile(latencies, 50) * 1000:.1f} ms, "
              f"p99 {percentile(latencies, 99) * 1000:.1f} ms, failed {failed}")


if __name__ == "__main__":
    main()
