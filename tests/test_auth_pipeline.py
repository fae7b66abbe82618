"""The order of authentication work for one message, and which verdicts refuse it."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

from mailforward.auth import executors
from mailforward.auth.arc import ArcSealer, sealer_from_settings
from mailforward.auth.dkim import DkimSigner, generate_key, load_dkim
from mailforward.auth.pipeline import MessageAuthenticator
from mailforward.auth.verify import Verifier
from mailforward.config import ArcSettings, AuthSettings, DkimSettings, Settings
from mailforward.errors import ConfigError, DmarcRejected, SpfRejected

# Served on loopback to every test that takes the ``nameserver`` fixture.
ZONE = """
hard.test.         300 IN TXT "v=spf1 ip4:192.0.2.1 -all"
strict.test.       300 IN TXT "v=spf1 ip4:192.0.2.1 -all"
_dmarc.strict.test. 300 IN TXT "v=DMARC1; p=reject"
"""
AUTHSERV = "mx.forwarder.test"


def message(sender: str) -> bytes:
    return f"From: <{sender}>\r\nTo: <a@example.org>\r\nSubject: s\r\n\r\nbody\r\n".encode()


def authenticator(nameserver: str, **options: bool) -> MessageAuthenticator:
    return MessageAuthenticator(Verifier(AUTHSERV, [nameserver], 2), None, None,
                                authserv_id=AUTHSERV, **options)


async def test_dmarc_reject_refuses_the_message(nameserver: str) -> None:
    with pytest.raises(DmarcRejected) as refused:
        await authenticator(nameserver).inbound(message("x@strict.test"), "127.0.0.1",
                                                "client.test", "x@strict.test")
    assert refused.value.domain == "strict.test"


async def test_dmarc_reject_can_be_turned_off(nameserver: str) -> None:
    content = await authenticator(nameserver, reject_dmarc_reject=False).inbound(
        message("x@strict.test"), "127.0.0.1", "client.test", "x@strict.test")
    assert b"dmarc=fail" in content


async def test_spf_fail_is_forwarded_by_default(nameserver: str) -> None:
    content = await authenticator(nameserver).inbound(message("x@hard.test"), "127.0.0.1",
                                                      "client.test", "x@hard.test")
    assert b"spf=fail" in content


async def test_spf_fail_is_refused_when_reject_spf_fail_is_on(nameserver: str) -> None:
    with pytest.raises(SpfRejected):
        await authenticator(nameserver, reject_spf_fail=True).inbound(
            message("x@hard.test"), "127.0.0.1", "client.test", "x@hard.test")


async def test_mynetworks_clients_are_labelled_but_never_refused(nameserver: str) -> None:
    content = await authenticator(nameserver, reject_spf_fail=True).inbound(
        message("x@strict.test"), "127.0.0.1", "client.test", "x@strict.test", trusted=True)
    assert content.startswith(f"Authentication-Results: {AUTHSERV};".encode())


async def test_without_verification_the_message_is_unchanged() -> None:
    plain = MessageAuthenticator(None, None, None, authserv_id=AUTHSERV)
    assert await plain.inbound(message("x@strict.test"), "127.0.0.1", "h", "x@strict.test") \
        == message("x@strict.test")


async def test_seal_covers_the_signature_which_covers_the_message(
        nameserver: str, tmp_path: Path) -> None:
    key = generate_key("example.org", "fwd", tmp_path, bits=1024)
    dkim_config = load_dkim(DkimSettings(keys=(f"{key.name} example.org:fwd:{key.path}",),
                                         sign_forwarded_as="example.org"))
    assert dkim_config is not None
    auth = MessageAuthenticator(Verifier(AUTHSERV, [nameserver], 2), DkimSigner(dkim_config),
                                ArcSealer(key, AUTHSERV), authserv_id=AUTHSERV)
    content = await auth.inbound(message("x@hard.test"), "127.0.0.1", "c.test", "x@hard.test")
    content = await auth.outbound(content, "127.0.0.1")
    names = [line.split(b":")[0] for line in content.split(b"\r\n\r\n")[0].split(b"\r\n")
             if line[:1] not in (b" ", b"\t")]
    assert names[:5] == [b"ARC-Seal", b"ARC-Message-Signature", b"ARC-Authentication-Results",
                         b"DKIM-Signature", b"Authentication-Results"]


class _NoDefaultExecutor(ThreadPoolExecutor):
    """Fails every task: the loop's default executor is for others (file work, fsync)."""

    def submit(self, *args: object, **kwargs: object) -> Future[object]:
        raise AssertionError("authentication work was sent to the default executor")


async def test_signing_sealing_and_verifying_stay_off_the_default_executor(
        nameserver: str, tmp_path: Path) -> None:
    key = generate_key("example.org", "fwd", tmp_path, bits=2048)
    dkim_config = load_dkim(DkimSettings(keys=(f"{key.name} example.org:fwd:{key.path}",),
                                         sign_forwarded_as="example.org"))
    assert dkim_config is not None
    signer, sealer = DkimSigner(dkim_config), ArcSealer(key, AUTHSERV)
    auth = MessageAuthenticator(Verifier(AUTHSERV, [nameserver], 2), signer, sealer,
                                authserv_id=AUTHSERV)
    loop = asyncio.get_running_loop()
    refusing = _NoDefaultExecutor(1)
    loop.set_default_executor(refusing)
    try:
        content = await auth.inbound(message("x@hard.test"), "127.0.0.1", "c.test",
                                     "x@hard.test")
        content = await auth.outbound(content, "127.0.0.1")
    finally:
        refusing.shutdown()
    assert content.startswith(b"ARC-Seal: ")
    assert signer.signing_failures == 0 and sealer.sealing_failures == 0


def signing_threads(auth: MessageAuthenticator, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the threads ``auth`` signs in, recorded as it signs."""
    threads: list[str] = []
    real = auth._sign_and_seal

    def recording(content: bytes, client_ip: str, results: bytes | None) -> bytes:
        threads.append(threading.current_thread().name)
        return real(content, client_ip, results)

    monkeypatch.setattr(auth, "_sign_and_seal", recording)
    return threads


def forwarding_signer(tmp_path: Path) -> MessageAuthenticator:
    key = generate_key("example.org", "fwd", tmp_path, bits=1024)
    dkim_config = load_dkim(DkimSettings(keys=(f"{key.name} example.org:fwd:{key.path}",),
                                         sign_forwarded_as="example.org"))
    assert dkim_config is not None
    return MessageAuthenticator(None, DkimSigner(dkim_config), None, authserv_id=AUTHSERV)


async def test_big_messages_are_signed_in_the_cpu_pool(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    auth = forwarding_signer(tmp_path)
    threads = signing_threads(auth, monkeypatch)
    big = message("x@example.org") + (b"x" * 78 + b"\r\n") * (executors.ON_LOOP_LIMIT // 80 + 1)
    signed = await auth.outbound(big, "127.0.0.1")
    assert signed.startswith(b"DKIM-Signature: ")
    assert len(threads) == 1 and threads[0].startswith(executors.CPU.name)
    assert executors.CPU.workers == executors.cpu_workers()


async def test_small_messages_are_signed_on_the_loop(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    auth = forwarding_signer(tmp_path)
    threads = signing_threads(auth, monkeypatch)
    signed = await auth.outbound(message("x@example.org"), "127.0.0.1")
    assert signed.startswith(b"DKIM-Signature: ")
    assert threads == [threading.current_thread().name]


def test_arc_without_a_key_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="fwd._domainkey.example.org"):
        sealer_from_settings(ArcSettings(domain="example.org", selector="fwd"), None, AUTHSERV)


def test_arc_needs_verification_on() -> None:
    with pytest.raises(ConfigError, match=r"\[auth\] verify"):
        Settings(auth=AuthSettings(verify=False),
                 arc=ArcSettings(domain="example.org", selector="fwd"))
