"""Three nodes on loopback: three ``mailforward serve`` processes on their own ports, one
MariaDB and one Redis between them, one sink behind them, and a client spreading its
messages across the three.  The sender limit holds in total, a ban added through the CLI
reaches every node within the TTL, and a retry through another node is suppressed.

The second node runs two worker processes: the limits are shared by workers as by nodes.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner

from mailforward.cli import main
from mailforward.config import DatabaseSettings

from conftest import mariadb_execute, mariadb_url, reset_mariadb, seed_reference_data
from smtp_harness import RawClient, ServeProcess, Sink, wait_until
from test_state import REDIS_URL, delete_prefix, redis_prefix

SENDER_LIMIT = 10
BAN_TTL = 1.0
SLACK = 2.0


@dataclass
class Cluster:
    nodes: list[ServeProcess]
    sink: Sink
    database_url: str

    def send(self, node: int, sender: str, recipient: str, content: str) -> str:
        """One transaction through node ``node``: the first refusal, or the DATA reply."""
        served = self.nodes[node]
        with RawClient(served.host, served.port) as c:
            c.read_reply()
            c.command("EHLO client.test")
            for command in (f"MAIL FROM:<{sender}>", f"RCPT TO:<{recipient}>"):
                reply = c.command(command)
                if not reply.startswith("250"):
                    c.command("QUIT")
                    return reply
            assert c.command("DATA").startswith("354")
            reply = c.command(content + ".")
            c.command("QUIT")
            return reply

    def greeting(self, node: int, source: str) -> str:
        """What a client at ``source`` is told on connecting to node ``node``."""
        served = self.nodes[node]
        with RawClient(served.host, served.port, source=source) as c:
            reply = c.read_reply()
            if reply.startswith("220"):
                c.command("QUIT")
            return reply


def node_config(path: Path, index: int, database_url: str, sink_port: int, prefix: str) -> Path:
    path.write_text(f"""
[server]
hostname = "node{index}.example.com"
listen = ["127.0.0.1:0"]
workers = {2 if index == 1 else 1}
client_connection_rate_limit = 10000

[database]
url = "{database_url}"

[delivery]
relay_host = "[127.0.0.1]:{sink_port}"
spool_directory = "{path.parent / f'spool{index}'}"

[auth]
verify = false

[limits]
sender_message_rate_limit = {SENDER_LIMIT}
time_unit = 60
ban_cache_ttl = {BAN_TTL}
redis_url = "{REDIS_URL}"
redis_prefix = "{prefix}"
""")
    return path


@pytest.fixture(scope="module")
def cluster(mariadb_database: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    reset_mariadb(mariadb_database)
    mariadb_execute(mariadb_database, "DROP TABLE IF EXISTS ban")
    url = mariadb_url(mariadb_database)
    asyncio.run(seed_reference_data(DatabaseSettings(url=url)))
    directory = tmp_path_factory.mktemp("nodes")
    prefix = redis_prefix()
    nodes: list[ServeProcess] = []
    with Sink() as sink:
        try:
            for index in range(3):
                config = node_config(directory / f"node{index}.toml", index, url, sink.port, prefix)
                nodes.append(ServeProcess(config, directory / f"node{index}.log"))
            assert len({node.port for node in nodes}) == 3
            yield Cluster(nodes, sink, url)
        finally:
            for node in nodes:
                node.stop()
            delete_prefix(prefix)


def content(message_id: str) -> str:
    return (f"From: <sender@ext.test>\r\nTo: <alice@example.org>\r\nSubject: cluster\r\n"
            f"Message-ID: {message_id}\r\n\r\nthe same body each time\r\n")


def test_a_sender_limit_holds_across_the_three_nodes(cluster: Cluster) -> None:
    sender = f"burst-{uuid.uuid4().hex[:8]}@ext.test"
    replies = [cluster.send(i % 3, sender, "alice@example.org", content(f"<b{i}@ext.test>"))
               for i in range(SENDER_LIMIT + 5)]
    accepted = [r for r in replies if r.startswith("250")]
    refused = [r for r in replies if not r.startswith("250")]
    assert len(accepted) == SENDER_LIMIT, replies
    assert set(refused) == {f"450 4.7.1 <{sender}>: Sender address rejected: too much mail "
                            "from this sender"}
    assert all(r.startswith("250") for r in replies[:SENDER_LIMIT])  # the first ten, in order
    assert {i % 3 for i in range(SENDER_LIMIT)} == {0, 1, 2}  # every node accepted some
    assert cluster.sink.count("alice.dest@sink.test") >= SENDER_LIMIT


def test_a_ban_added_through_the_cli_is_enforced_by_every_node_within_the_ttl(
        cluster: Cluster) -> None:
    client = f"127.0.0.{random.randint(2, 250)}"  # a client of this test's own
    assert all(cluster.greeting(node, client).startswith("220") for node in range(3))
    env = {"MAILFORWARD_DATABASE__URL": cluster.database_url}
    result = CliRunner().invoke(main, ["ban", "add", "client", client, "--reason", "test"],
                                env=env)
    assert result.exit_code == 0, result.output
    started = time.monotonic()
    refusal = f"554 5.7.1 <unknown[{client}]>: Client host rejected: Access denied"
    for node in range(3):
        wait_until(lambda node=node: cluster.greeting(node, client) == refusal,  # type: ignore[misc]
                   BAN_TTL + SLACK, what=f"node {node} enforcing the ban", interval=0.05)
    assert time.monotonic() - started <= BAN_TTL + SLACK
    for node in range(3):  # every worker of every node, not one that happened to refresh
        assert all(cluster.greeting(node, client) == refusal for _ in range(4))
        assert cluster.greeting(node, "127.0.0.1").startswith("220")

    removed = CliRunner().invoke(main, ["ban", "remove", "client", client], env=env)
    assert removed.exit_code == 0
    for node in range(3):
        wait_until(lambda node=node: cluster.greeting(node, client).startswith("220"),  # type: ignore[misc]
                   BAN_TTL + SLACK, what=f"node {node} lifting the ban", interval=0.05)
    listed = CliRunner().invoke(main, ["ban", "list", "--json"], env=env)
    assert client not in [b["value"] for b in json.loads(listed.output)]


def test_a_retry_through_another_node_is_suppressed(cluster: Cluster) -> None:
    sender = f"retry-{uuid.uuid4().hex[:8]}@ext.test"
    message_id = f"<{uuid.uuid4().hex}@ext.test>"
    before = cluster.sink.count("alice.dest@sink.test")
    assert cluster.send(0, sender, "alice@example.org", content(message_id)).startswith("250")
    assert cluster.sink.count("alice.dest@sink.test") == before + 1  # reached the sink via node 1
    for node in (2, 1):  # the sender retries through node 3, then node 2
        reply = cluster.send(node, sender, "alice@example.org", content(message_id))
        assert reply.startswith("250 2.0.0 Ok: queued as ")
    assert cluster.sink.count("alice.dest@sink.test") == before + 1
    assert "duplicate of a message already delivered" in cluster.nodes[2].log_text()
    other = cluster.send(2, sender, "alice@example.org", content(f"<{uuid.uuid4().hex}@x>"))
    assert other.startswith("250")
    assert cluster.sink.count("alice.dest@sink.test") == before + 2
