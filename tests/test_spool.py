"""The spool (mailforward.delivery.spool) and retries (mailforward.delivery.retry).

The spool is what lets the server answer 250 before every destination has a
message, so these tests are about durability: crashes leave nothing half
loaded, disk errors surface as SpoolError, and a recipient once marked
delivered is never attempted again, across restarts.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import stat
import tempfile
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailforward.delivery.base import Message, RecipientDsn
from mailforward.delivery.retry import (
    AttemptResult,
    RetryPolicy,
    RetryScheduler,
)
from mailforward.delivery.spool import (
    InvalidQueueId,
    Spool,
    SpoolCorrupt,
    SpooledMessage,
    SpoolEntry,
    SpoolError,
    SpoolMissing,
    SpoolNotFound,
)
from mailforward.errors import MailforwardError
from mailforward.smtpd.replies import Reply

from smtp_harness import Clock, async_wait_until

T0 = 1_700_000_000.0
BINARY = bytes(range(256)) + b"\r\n.\r\n\n\n\r\r\x00" + "héllo".encode()
CONTENT = b"From: a@example.org\r\nSubject: test\r\n\r\nbody\r\n"
USER_UNKNOWN = Reply(550, "5.1.1", "<c@example.net>: User unknown")


def message(queue_id: str = "ABC123", recipients: tuple[str, ...] = ("a@x.test", "b@y.test"),
            content: bytes = CONTENT, sender: str = "s@example.org") -> Message:
    return Message(queue_id, sender, recipients, content, "192.0.2.1")


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    return Spool(tmp_path / "spool")


def put(spool: Spool, msg: Message | None = None, pending: tuple[str, ...] | None = None,
        next_attempt: float = T0 + 300) -> SpooledMessage:
    msg = msg or message()
    return spool.put(msg, msg.recipients if pending is None else pending, T0, next_attempt)


# --- storing and reading


def test_get_returns_binary_content_unchanged(spool: Spool) -> None:
    put(spool, message(content=BINARY))
    assert spool.get("ABC123").content == BINARY


def test_get_returns_the_envelope_put(spool: Spool) -> None:
    put(spool, message(recipients=("a@x.test", "b@y.test", "c@z.test")),
        pending=("a@x.test", "c@z.test"))
    got = spool.get("ABC123")
    assert (got.sender, got.pending, got.delivered, got.failed) == (
        "s@example.org", ("a@x.test", "c@z.test"), ("b@y.test",), ())
    assert (got.created, got.attempts, got.next_attempt, got.client_ip) == (
        T0, 1, T0 + 300, "192.0.2.1")


def test_put_records_errors_for_pending_recipients(spool: Spool) -> None:
    spool.put(message(), ["a@x.test"], T0, T0 + 300,
              errors={"a@x.test": "451 4.4.1 try later", "b@y.test": "ignored"})
    assert spool.get("ABC123").errors == {"a@x.test": "451 4.4.1 try later"}


def test_message_is_addressed_to_pending_recipients_only(spool: Spool) -> None:
    put(spool, pending=("b@y.test",))
    assert spool.get("ABC123").message().recipients == ("b@y.test",)


def test_aliases_survive_the_spool(spool: Spool) -> None:
    aliases = {"a@x.test": "friend@alias.test", "b@y.test": "pal@alias.test"}
    spool.put(replace(message(), aliases=aliases), ["b@y.test"], T0, T0)
    assert Spool(spool.directory).get("ABC123").message().aliases == aliases


def test_spool_file_written_before_aliases_existed_still_loads(spool: Spool) -> None:
    put(spool)
    path = spool.directory / "ABC123"
    header, _, content = path.read_bytes().partition(b"\n")
    data: dict[str, Any] = json.loads(header)
    del data["aliases"]
    path.write_bytes(json.dumps(data).encode() + b"\n" + content)
    assert spool.get("ABC123").aliases == {}


DSN_PARAMETERS = {"a@x.test": RecipientDsn("SUCCESS,FAILURE", "rfc822;friend+2Bx@alias.test"),
                  "b@y.test": RecipientDsn("NEVER", "")}


def with_extensions(msg: Message) -> Message:
    return replace(msg, body="8BITMIME", dsn_ret="FULL", dsn_envid="Env+2B1",
                   dsn=DSN_PARAMETERS)


def test_body_and_dsn_parameters_survive_the_spool(spool: Spool) -> None:
    spool.put(with_extensions(message()), ["a@x.test", "b@y.test"], T0, T0)
    got = Spool(spool.directory).get("ABC123").message()
    assert (got.body, got.dsn_ret, got.dsn_envid, got.dsn) == (
        "8BITMIME", "FULL", "Env+2B1", DSN_PARAMETERS)


def test_dsn_parameters_survive_an_update(spool: Spool) -> None:
    spool.put(with_extensions(message()), ["a@x.test", "b@y.test"], T0, T0)
    spool.mark_delivered("ABC123", ["b@y.test"])
    assert spool.get("ABC123").dsn_of("a@x.test") == DSN_PARAMETERS["a@x.test"]


def test_spool_file_written_before_body_and_dsn_existed_still_loads(spool: Spool) -> None:
    put(spool)
    path = spool.directory / "ABC123"
    header, _, content = path.read_bytes().partition(b"\n")
    data: dict[str, Any] = json.loads(header)
    for key in ("body", "dsn_ret", "dsn_envid", "dsn"):
        del data[key]
    path.write_bytes(json.dumps(data).encode() + b"\n" + content)
    got = spool.get("ABC123")
    assert (got.body, got.dsn_ret, got.dsn_envid, got.dsn) == ("", "", "", {})


@pytest.mark.parametrize("key, value", [("body", "BINARYMIME"), ("dsn_ret", "ALL"),
                                        ("dsn_envid", 7), ("dsn", {"a@x.test": "NEVER"})])
def test_header_with_a_bad_body_or_dsn_field_is_corrupt(spool: Spool, key: str,
                                                         value: Any) -> None:
    put(spool)
    path = spool.directory / "ABC123"
    header, _, content = path.read_bytes().partition(b"\n")
    data: dict[str, Any] = json.loads(header)
    data[key] = value
    path.write_bytes(json.dumps(data).encode() + b"\n" + content)
    with pytest.raises(SpoolCorrupt):
        spool.get("ABC123")


def test_header_with_aliases_that_are_not_strings_is_corrupt(spool: Spool) -> None:
    put(spool)
    path = spool.directory / "ABC123"
    header, _, content = path.read_bytes().partition(b"\n")
    data: dict[str, Any] = json.loads(header)
    data["aliases"] = {"a@x.test": 1}
    path.write_bytes(json.dumps(data).encode() + b"\n" + content)
    with pytest.raises(SpoolCorrupt):
        spool.get("ABC123")


@settings(max_examples=30, deadline=None)
@given(content=st.binary(max_size=2000),
       sender=st.text(max_size=40),
       recipients=st.lists(st.text(min_size=1, max_size=30), min_size=1, max_size=5, unique=True))
def test_round_trip_holds_for_any_content_and_addresses(content: bytes, sender: str,
                                                        recipients: list[str]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        spool = Spool(Path(tmp))
        spool.put(Message("Q1", sender, tuple(recipients), content), recipients, T0, T0)
        got = spool.get("Q1")
        assert (got.content, got.sender, got.pending) == (content, sender, tuple(recipients))


def test_spool_directory_is_created_private(tmp_path: Path) -> None:
    Spool(tmp_path / "a" / "spool")
    assert stat.S_IMODE((tmp_path / "a" / "spool").stat().st_mode) == 0o700


def test_spool_files_are_private(spool: Spool) -> None:
    put(spool)
    assert stat.S_IMODE((spool.directory / "ABC123").stat().st_mode) == 0o600


def test_put_refuses_a_queue_id_already_spooled(spool: Spool) -> None:
    put(spool, message(content=b"first"))
    with pytest.raises(SpoolError, match="already"):
        put(spool, message(content=b"second"))
    assert spool.get("ABC123").content == b"first"


def test_put_refuses_pending_recipients_not_in_the_message(spool: Spool) -> None:
    with pytest.raises(ValueError):
        put(spool, pending=("stranger@z.test",))


def test_get_of_unknown_queue_id_raises_not_found(spool: Spool) -> None:
    with pytest.raises(SpoolNotFound):
        spool.get("NOSUCH")


def test_list_is_sorted_by_next_attempt(spool: Spool) -> None:
    put(spool, message("LATE"), next_attempt=T0 + 900)
    put(spool, message("SOON"), next_attempt=T0 + 100)
    put(spool, message("MID"), next_attempt=T0 + 500)
    assert [e.queue_id for e in spool.list()] == ["SOON", "MID", "LATE"]


def test_list_returns_envelopes_without_content(spool: Spool) -> None:
    put(spool)
    [entry] = spool.list()
    assert type(entry) is SpoolEntry and entry.size == len(CONTENT)


def test_due_returns_only_messages_whose_time_has_come(spool: Spool) -> None:
    put(spool, message("NOW"), next_attempt=T0 + 300)
    put(spool, message("LATER"), next_attempt=T0 + 301)
    assert [e.queue_id for e in spool.due(T0 + 300)] == ["NOW"]


def test_remove_deletes_the_message(spool: Spool) -> None:
    put(spool)
    spool.remove("ABC123")
    assert spool.list() == []


def test_remove_of_unknown_queue_id_raises_not_found(spool: Spool) -> None:
    with pytest.raises(SpoolNotFound):
        spool.remove("NOSUCH")


def test_flush_makes_every_message_due(spool: Spool) -> None:
    put(spool, message("A1"), next_attempt=T0 + 900)
    put(spool, message("A2"), next_attempt=T0 + 9000)
    assert spool.flush(T0) == 2
    assert [e.queue_id for e in spool.due(T0)] == ["A1", "A2"]


# --- updates


def test_mark_delivered_moves_recipients_out_of_pending(spool: Spool) -> None:
    put(spool)
    updated = spool.mark_delivered("ABC123", ["a@x.test"])
    assert (updated.pending, updated.delivered) == (("b@y.test",), ("a@x.test",))


def test_mark_delivered_survives_a_restart(spool: Spool) -> None:
    put(spool)
    spool.mark_delivered("ABC123", ["a@x.test"])
    reopened = Spool(spool.directory)
    assert reopened.get("ABC123").pending == ("b@y.test",)
    assert reopened.list()[0].pending == ("b@y.test",)


def test_mark_delivered_twice_is_harmless(spool: Spool) -> None:
    put(spool)
    spool.mark_delivered("ABC123", ["a@x.test"])
    again = spool.mark_delivered("ABC123", ["a@x.test"])
    assert (again.pending, again.delivered) == (("b@y.test",), ("a@x.test",))


def test_mark_delivered_fsyncs_before_returning(spool: Spool,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    put(spool)
    synced: list[int] = []
    real_fsync = os.fsync

    def spy(fd: int) -> None:
        synced.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    spool.mark_delivered("ABC123", ["a@x.test"])
    assert len(synced) >= 2  # the new file and the directory holding its name


def test_failed_update_leaves_the_previous_state(spool: Spool,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    put(spool)
    monkeypatch.setattr(os, "fsync", _raise(errno.EIO))
    with pytest.raises(SpoolError):
        spool.mark_delivered("ABC123", ["a@x.test"])
    monkeypatch.undo()
    assert spool.get("ABC123").pending == ("a@x.test", "b@y.test")


def test_mark_failed_drops_recipients_from_pending(spool: Spool) -> None:
    put(spool)
    updated = spool.mark_failed("ABC123", {"b@y.test": "550 5.1.1 unknown"})
    assert (updated.pending, updated.failed) == (("a@x.test",), ("b@y.test",))


def test_reschedule_sets_time_attempts_and_errors(spool: Spool) -> None:
    put(spool)
    spool.reschedule("ABC123", T0 + 600, 2, {"a@x.test": "451 4.4.1 busy"})
    got = spool.get("ABC123")
    assert (got.next_attempt, got.attempts, got.errors) == (T0 + 600, 2,
                                                            {"a@x.test": "451 4.4.1 busy"})


# --- what a DSN of ours reports on


def test_original_queue_id_of_a_dsn_survives_the_spool(spool: Spool) -> None:
    put(spool, replace(message("DSN0001"), original_queue_id="ABC123"))
    assert spool.get("DSN0001").original_queue_id == "ABC123"
    assert Spool(spool.directory).list()[0].original_queue_id == "ABC123"


def test_file_without_original_queue_id_loads_as_ordinary_mail(spool: Spool) -> None:
    put(spool)
    assert b"original_queue_id" not in (spool.directory / "ABC123").read_bytes()
    assert spool.get("ABC123").original_queue_id == ""


def test_original_queue_id_that_is_not_a_queue_id_is_corrupt(spool: Spool) -> None:
    put(spool)
    path = spool.directory / "ABC123"
    header, _, content = path.read_bytes().partition(b"\n")
    fields = json.loads(header)
    fields["original_queue_id"] = "../x"
    path.write_bytes(json.dumps(fields).encode() + b"\n" + content)
    with pytest.raises(SpoolCorrupt):
        spool.get("ABC123")


# --- read-only


def test_read_only_spool_of_a_missing_directory_creates_nothing(tmp_path: Path) -> None:
    with pytest.raises(SpoolMissing):
        Spool(tmp_path / "var" / "spool", read_only=True)
    with pytest.raises(SpoolMissing):
        Spool(tmp_path / "var" / "spool", create=False)
    assert list(tmp_path.iterdir()) == []


def test_read_only_spool_lists_and_reads_but_changes_nothing_on_disk(spool: Spool) -> None:
    put(spool)
    leftover = spool.directory / ".tmp-ABC123-999999999-abcd"
    leftover.write_bytes(b"half written")
    (spool.directory / "BAD1").write_bytes(b"not json\n\ncontent")
    before = sorted(p.name for p in spool.directory.iterdir())
    reader = Spool(spool.directory, read_only=True)
    assert [e.queue_id for e in reader.list()] == ["ABC123"]
    assert reader.get("ABC123").content == CONTENT
    with pytest.raises(SpoolCorrupt, match="left in place"):
        reader.get("BAD1")
    assert sorted(p.name for p in spool.directory.iterdir()) == before  # no .lock, no corrupt/


def test_read_only_spool_refuses_to_write(spool: Spool) -> None:
    put(spool)
    reader = Spool(spool.directory, read_only=True)
    for change in (lambda: reader.mark_delivered("ABC123", ["a@x.test"]),
                   lambda: reader.remove("ABC123"),
                   lambda: reader.put(message("NEW1"), ["a@x.test"], T0, T0)):
        with pytest.raises(SpoolError, match="read-only"):
            change()
    assert spool.get("ABC123").pending == ("a@x.test", "b@y.test")


# --- crashes and corruption


def test_leftover_temp_file_is_never_listed(spool: Spool) -> None:
    (spool.directory / ".tmp-ABC123-999999999-abcd").write_bytes(b'{"version":1')
    assert spool.list() == []


def test_leftover_temp_file_is_removed_at_start(spool: Spool) -> None:
    leftover = spool.directory / ".tmp-ABC123-999999999-abcd"
    leftover.write_bytes(b"half written")
    Spool(spool.directory)
    assert not leftover.exists()


def test_temp_file_of_a_live_writer_is_kept_at_start(spool: Spool) -> None:
    in_flight = spool.directory / f".tmp-ABC123-{os.getppid()}-abcd"
    in_flight.write_bytes(b"being written")
    Spool(spool.directory)
    assert in_flight.exists()


def test_truncated_file_is_not_loaded(spool: Spool) -> None:
    put(spool, message(content=BINARY))
    path = spool.directory / "ABC123"
    path.write_bytes(path.read_bytes()[:-10])
    assert spool.list() == []


def test_truncated_file_is_moved_to_corrupt(spool: Spool) -> None:
    put(spool, message(content=BINARY))
    path = spool.directory / "ABC123"
    data = path.read_bytes()[:-10]
    path.write_bytes(data)
    spool.list()
    assert not path.exists()
    assert (spool.directory / "corrupt" / "ABC123").read_bytes() == data


def test_get_of_a_corrupt_file_raises_and_keeps_it(spool: Spool) -> None:
    (spool.directory / "BAD1").write_bytes(b"not json\n\ncontent")
    with pytest.raises(SpoolCorrupt):
        spool.get("BAD1")
    assert (spool.directory / "corrupt" / "BAD1").exists()


def test_file_naming_another_queue_id_is_corrupt(spool: Spool) -> None:
    put(spool)
    os.rename(spool.directory / "ABC123", spool.directory / "OTHER1")
    assert spool.list() == []
    assert (spool.directory / "corrupt" / "OTHER1").exists()


def test_header_with_wrong_field_type_is_corrupt(spool: Spool) -> None:
    put(spool)
    path = spool.directory / "ABC123"
    header, _, content = path.read_bytes().partition(b"\n")
    data: dict[str, Any] = json.loads(header)
    data["pending"] = "a@x.test"
    path.write_bytes(json.dumps(data).encode() + b"\n" + content)
    with pytest.raises(SpoolCorrupt):
        spool.get("ABC123")


def test_second_corrupt_file_of_same_name_does_not_overwrite_the_first(spool: Spool) -> None:
    for _ in range(2):
        (spool.directory / "BAD1").write_bytes(b"garbage")
        spool.list()
    assert sorted(p.name for p in (spool.directory / "corrupt").iterdir()) == ["BAD1", "BAD1.1"]


# --- failures become SpoolError


def _raise(code: int) -> Any:
    def fail(*args: object) -> None:
        raise OSError(code, os.strerror(code))
    return fail


def test_spool_error_when_directory_cannot_be_created(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(SpoolError):
        Spool(tmp_path / "file" / "spool")


def test_spool_error_is_a_mailforward_error() -> None:
    assert issubclass(SpoolError, MailforwardError)


def test_put_raises_spool_error_when_disk_is_full(spool: Spool,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "write", _raise(errno.ENOSPC))
    with pytest.raises(SpoolError, match="No space"):
        put(spool)


def test_put_raises_spool_error_when_fsync_fails(spool: Spool,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "fsync", _raise(errno.EIO))
    with pytest.raises(SpoolError):
        put(spool)


def test_failed_put_leaves_no_file_behind(spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "write", _raise(errno.ENOSPC))
    with pytest.raises(SpoolError):
        put(spool)
    monkeypatch.undo()
    assert [p for p in spool.directory.iterdir() if p.name != ".lock"] == []


def test_spool_error_when_directory_vanishes(spool: Spool) -> None:
    spool.directory.rmdir()
    with pytest.raises(SpoolError):
        put(spool)


# --- queue ids


@pytest.mark.parametrize("queue_id", ["../etc", "abc123", "", "A/B", ".tmp-X", "A" * 33, "ÄB"])
def test_invalid_queue_id_is_refused_by_get(spool: Spool, queue_id: str) -> None:
    with pytest.raises(InvalidQueueId):
        spool.get(queue_id)


def test_invalid_queue_id_is_refused_by_put(spool: Spool) -> None:
    with pytest.raises(InvalidQueueId):
        put(spool, message(queue_id="../../x"))


def test_invalid_queue_id_is_refused_by_remove(spool: Spool) -> None:
    with pytest.raises(InvalidQueueId):
        spool.remove("..")


def test_files_without_a_queue_id_name_are_ignored(spool: Spool) -> None:
    (spool.directory / "notes.txt").write_text("operator notes")
    assert spool.list() == []
    assert (spool.directory / "notes.txt").exists()


# --- RetryPolicy


def test_backoff_doubles_from_first_retry_up_to_max() -> None:
    policy = RetryPolicy()
    delays = [policy.next_attempt(T0, n, T0) - T0 for n in range(1, 8)]
    assert delays == [300, 600, 1200, 2400, 3600, 3600, 3600]


def test_backoff_survives_huge_attempt_counts() -> None:
    assert RetryPolicy().next_attempt(T0, 10_000, T0) == T0 + 3600


def test_next_attempt_is_never_after_expiry() -> None:
    policy = RetryPolicy()
    created = T0 - policy.max_lifetime + 100
    assert policy.next_attempt(created, 9, T0) == T0 + 100


def test_expired_message_backs_off_normally() -> None:
    policy = RetryPolicy()
    assert policy.next_attempt(T0 - policy.max_lifetime, 1, T0) == T0 + 300


def test_message_is_not_expired_just_before_max_lifetime() -> None:
    assert not RetryPolicy().expired(T0, T0 + 5 * 86400 - 0.001)


def test_message_is_expired_at_max_lifetime() -> None:
    assert RetryPolicy().expired(T0, T0 + 5 * 86400)


# --- RetryScheduler


class FakeDelivery:
    """Answers each recipient from ``outcomes``: "ok", "defer" or "fail"."""

    def __init__(self, outcomes: Mapping[str, str]) -> None:
        self.outcomes = dict(outcomes)
        self.attempted: list[tuple[str, tuple[str, ...]]] = []
        self.bounced: list[tuple[str, dict[str, str]]] = []

    async def attempt(self, msg: SpooledMessage) -> AttemptResult:
        self.attempted.append((msg.queue_id, msg.pending))
        by = {kind: [r for r in msg.pending if self.outcomes.get(r) == kind]
              for kind in ("ok", "defer", "fail")}
        return AttemptResult(delivered=frozenset(by["ok"]),
                             deferred={r: "451 4.4.1 busy" for r in by["defer"]},
                             failed={r: USER_UNKNOWN for r in by["fail"]})

    async def bounce(self, msg: SpooledMessage, failures: Mapping[str, str]) -> None:
        self.bounced.append((msg.queue_id, dict(failures)))


def scheduler(spool: Spool, fake: FakeDelivery, now: float = T0) -> RetryScheduler:
    return RetryScheduler(spool, RetryPolicy(), fake.attempt, fake.bounce, clock=Clock(now))


async def test_run_once_attempts_only_due_messages(spool: Spool) -> None:
    put(spool, message("DUE"), next_attempt=T0)
    put(spool, message("NOTYET"), next_attempt=T0 + 1)
    fake = FakeDelivery({})
    assert await scheduler(spool, fake).run_once(T0) == 1
    assert {q for q, _ in fake.attempted} == {"DUE"}  # once per destination (x.test, y.test)


async def test_fully_delivered_message_is_removed(spool: Spool) -> None:
    put(spool, next_attempt=T0)
    await scheduler(spool, FakeDelivery({"a@x.test": "ok", "b@y.test": "ok"})).run_once(T0)
    assert spool.list() == []


async def test_mixed_result_keeps_only_deferred_recipients_pending(spool: Spool) -> None:
    put(spool, message(recipients=("a@x.test", "b@y.test", "c@z.test")), next_attempt=T0)
    fake = FakeDelivery({"a@x.test": "ok", "b@y.test": "defer", "c@z.test": "fail"})
    await scheduler(spool, fake).run_once(T0)
    got = spool.get("ABC123")
    assert (got.pending, got.delivered, got.failed) == (("b@y.test",), ("a@x.test",),
                                                        ("c@z.test",))


async def test_permanent_failure_is_bounced_with_the_reply(spool: Spool) -> None:
    put(spool, next_attempt=T0)
    fake = FakeDelivery({"a@x.test": "ok", "b@y.test": "fail"})
    await scheduler(spool, fake).run_once(T0)
    assert fake.bounced == [("ABC123", {"b@y.test": str(USER_UNKNOWN)})]


async def test_deferred_message_is_rescheduled_with_backoff(spool: Spool) -> None:
    put(spool, next_attempt=T0)  # attempts == 1: the pass-through attempt
    await scheduler(spool, FakeDelivery({"a@x.test": "defer", "b@y.test": "defer"})).run_once(T0)
    got = spool.get("ABC123")
    assert (got.attempts, got.next_attempt) == (2, T0 + 600)
    assert got.errors == {"a@x.test": "451 4.4.1 busy", "b@y.test": "451 4.4.1 busy"}


async def test_recipient_missing_from_result_stays_pending(spool: Spool) -> None:
    put(spool, next_attempt=T0)
    await scheduler(spool, FakeDelivery({"a@x.test": "ok"})).run_once(T0)
    assert spool.get("ABC123").pending == ("b@y.test",)


async def test_crashing_attempt_defers_every_recipient(spool: Spool) -> None:
    put(spool, next_attempt=T0)

    async def crash(msg: SpooledMessage) -> AttemptResult:
        raise RuntimeError("boom")

    fake = FakeDelivery({})
    await RetryScheduler(spool, RetryPolicy(), crash, fake.bounce).run_once(T0)
    got = spool.get("ABC123")
    assert (got.pending, got.attempts) == (("a@x.test", "b@y.test"), 2)


async def test_crashing_attempt_records_the_exception_type_as_the_reason(spool: Spool) -> None:
    put(spool, next_attempt=T0)

    async def crash(msg: SpooledMessage) -> AttemptResult:
        raise RuntimeError("boom: internal detail")

    await RetryScheduler(spool, RetryPolicy(), crash, FakeDelivery({}).bounce).run_once(T0)
    assert set(spool.get("ABC123").errors.values()) == {
        str(Reply(451, "4.3.0", "internal error (RuntimeError)"))}


async def test_expired_message_bounces_what_is_pending_and_is_removed(spool: Spool) -> None:
    put(spool, next_attempt=T0)
    fake = FakeDelivery({"a@x.test": "ok", "b@y.test": "defer"})
    later = T0 + RetryPolicy().max_lifetime
    await scheduler(spool, fake, later).run_once(later)
    [(queue_id, failures)] = fake.bounced
    assert list(failures) == ["b@y.test"]
    assert failures["b@y.test"].startswith("delivery time expired")
    assert spool.list() == []


async def test_no_bounce_for_a_recipient_whose_notify_excludes_failure(spool: Spool) -> None:
    dsn = {"b@y.test": RecipientDsn("SUCCESS", ""), "c@z.test": RecipientDsn("NEVER", "")}
    put(spool, replace(message(recipients=("a@x.test", "b@y.test", "c@z.test")), dsn=dsn),
        next_attempt=T0)
    fake = FakeDelivery({"a@x.test": "fail", "b@y.test": "fail", "c@z.test": "fail"})
    await scheduler(spool, fake).run_once(T0)
    assert [list(failures) for _, failures in fake.bounced] == [["a@x.test"]]
    assert spool.list() == []  # failed all the same: never retried


async def test_no_expiry_bounce_when_notify_is_never(spool: Spool) -> None:
    put(spool, replace(message(), dsn={"b@y.test": RecipientDsn("NEVER", "")}), next_attempt=T0)
    fake = FakeDelivery({"a@x.test": "ok", "b@y.test": "defer"})
    later = T0 + RetryPolicy().max_lifetime
    await scheduler(spool, fake, later).run_once(later)
    assert (fake.bounced, spool.list()) == ([], [])


async def test_expired_message_gets_a_last_attempt_before_bouncing(spool: Spool) -> None:
    put(spool, next_attempt=T0)
    fake = FakeDelivery({"a@x.test": "ok", "b@y.test": "ok"})
    later = T0 + RetryPolicy().max_lifetime
    await scheduler(spool, fake, later).run_once(later)
    assert (fake.bounced, spool.list()) == ([], [])


async def test_null_sender_gets_no_bounce(spool: Spool) -> None:
    put(spool, message(sender=""), next_attempt=T0)
    fake = FakeDelivery({"a@x.test": "fail", "b@y.test": "fail"})
    await scheduler(spool, fake).run_once(T0)
    assert (fake.bounced, spool.list()) == ([], [])


async def test_recipient_stays_pending_when_its_bounce_cannot_be_sent(spool: Spool) -> None:
    put(spool, next_attempt=T0)
    fake = FakeDelivery({"a@x.test": "ok", "b@y.test": "fail"})

    async def broken_bounce(msg: SpooledMessage, failures: Mapping[str, str]) -> None:
        raise OSError("cannot spool the DSN")

    await RetryScheduler(spool, RetryPolicy(), fake.attempt, broken_bounce).run_once(T0)
    assert spool.get("ABC123").pending == ("b@y.test",)


class Crash(BaseException):
    """The process dying: nothing catches it."""


async def test_restart_never_reattempts_a_delivered_recipient(
        spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    put(spool, next_attempt=T0)
    fake = FakeDelivery({"a@x.test": "ok", "b@y.test": "defer"})
    monkeypatch.setattr(spool, "reschedule", _crash)
    with pytest.raises(Crash):  # dies after marking a@ delivered, before rescheduling
        await scheduler(spool, fake).run_once(T0)
    restarted = Spool(spool.directory)
    await scheduler(restarted, fake).run_once(T0 + 10)
    # first one attempt per destination, then only the recipient still pending
    assert sorted(fake.attempted[:2]) == [("ABC123", ("a@x.test",)), ("ABC123", ("b@y.test",))]
    assert fake.attempted[2:] == [("ABC123", ("b@y.test",))]


def _crash(*args: object) -> None:
    raise Crash()


async def test_message_with_nothing_pending_is_removed_without_attempt(spool: Spool) -> None:
    put(spool, next_attempt=T0)
    spool.mark_delivered("ABC123", ["a@x.test", "b@y.test"])  # crashed before remove
    fake = FakeDelivery({})
    await scheduler(spool, fake).run_once(T0)
    assert (fake.attempted, spool.list()) == ([], [])


async def test_flush_wakes_run_forever(spool: Spool) -> None:
    fake = FakeDelivery({"a@x.test": "ok", "b@y.test": "ok"})
    sched = scheduler(spool, fake)
    scans = 0
    run_once = sched.run_once

    async def counted_run_once(now: float) -> None:
        nonlocal scans
        await run_once(now)
        scans += 1

    sched.run_once = counted_run_once  # type: ignore[method-assign]
    task = asyncio.create_task(sched.run_forever(interval=3600))
    await async_wait_until(lambda: scans == 1)  # first, empty, scan done; now sleeping for an hour
    put(spool, next_attempt=T0 + 3000)
    assert sched.flush() == 1
    await async_wait_until(lambda: fake.attempted)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert {q for q, _ in fake.attempted} == {"ABC123"}


def test_attempt_result_from_success_reply_delivers_everyone() -> None:
    result = AttemptResult.from_reply(["a", "b"], Reply(250, "2.0.0", "Ok"))
    assert result.delivered == {"a", "b"}


def test_attempt_result_from_temporary_reply_defers_everyone() -> None:
    result = AttemptResult.from_reply(["a"], Reply(451, "4.4.1", "later"))
    assert result.deferred == {"a": "451 4.4.1 later"}


def test_attempt_result_from_permanent_reply_fails_everyone() -> None:
    assert AttemptResult.from_reply(["a"], USER_UNKNOWN).failed == {"a": USER_UNKNOWN}
