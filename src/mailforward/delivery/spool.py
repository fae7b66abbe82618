"""Durable storage for messages that pass-through delivery could not finish.

The server answers 250 only once a message is delivered or safely on disk, so
:meth:`Spool.put` is durable when it returns and every failure to get there
raises :class:`SpoolError` (the SMTP layer answers 451 and the sender keeps
the message).

On-disk format: one file per message, named by its queue id, in the spool
directory.  The file is a single line of ASCII JSON (the envelope, see
:data:`FORMAT_VERSION`), a ``\\n``, then the raw content bytes unchanged.  The
envelope records the content length, so a truncated file is detected even
without reading the content.  Fields added later (``aliases``; ``body``,
``dsn_ret``, ``dsn_envid`` and the per-destination ``dsn`` parameters of
RFC 3461, which retries and their bounces honour; ``original_queue_id``, the
message a DSN of ours reports on) are optional when reading, so files
written before them still load.  ``errors`` holds each pending recipient's
last reply, from the pass-through attempt on.

Every write goes to a temp file (``.tmp-<queue id>-<pid>-<random>``) in the
same directory, is flushed and fsynced, renamed over (or linked to) the final
name, and the directory is fsynced: a file with a queue-id name is always
complete.  Temp files are never loaded; stale ones (their process is gone,
or older than :data:`STALE_TEMP_AGE`) are removed when a Spool is opened.  A
file that does not parse is moved to ``corrupt/`` and logged, never deleted.

Read-modify-write operations (:meth:`Spool.mark_delivered`, ...) and removal
hold an exclusive ``flock`` on ``.lock`` in the directory, so a CLI command
and the running server (or two threads) cannot undo each other's updates --
a lost ``delivered`` mark would mean sending twice.

**Read-only.**  ``Spool(directory, read_only=True)`` (``queue list`` and
``show``) creates nothing: no directory, no lock file, no ``corrupt/``; it
removes no temp file and moves no corrupt file aside (it skips it, with a
warning).  A missing directory raises :class:`SpoolMissing`, as it does with
``create=False`` (``queue flush`` and ``delete``, which write).

**The index.**  A :class:`Spool` keeps every envelope in memory: the
headers are read once (the first :meth:`Spool.list`), and its own writes
update the index directly.  Later listings read only files that are new or
changed (another process -- a worker, the ``queue`` CLI -- wrote them): each
file's inode, size and mtime say whether it changed, and while the
directory's mtime has not moved, nothing is even looked at.  Message
content is read only for an attempt.

**What the disk would not take.**  A delivery that cannot be recorded (disk
full, read-only, I/O error) is remembered by the Spool object
(:meth:`Spool.remember_delivered`): every envelope it hands out shows those
recipients as delivered, so they are never sent again while the process
lives, and the next successful write of that message stores it.  Likewise a
retry time that cannot be written (:meth:`Spool.postpone`).
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, TypeVar

from ..errors import MailforwardError
from .base import NO_DSN_PARAMETERS, Message, RecipientDsn

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
QUEUE_ID_RE = re.compile(r"[A-Z0-9]{1,32}")
TEMP_PREFIX = ".tmp-"
LOCK_NAME = ".lock"
CORRUPT_DIR = "corrupt"
MAX_HEADER = 16 * 1024 * 1024  # an envelope line longer than this is corrupt
STALE_TEMP_AGE = 3600.0  # a temp file this old is a leftover whatever its pid says
# A directory whose mtime is this much older than our last scan of it shows every change since.
DIRECTORY_TICK = 1.0

Stamp = tuple[int, int, int]  # (inode, size, mtime_ns) of a spool file: any rewrite changes it


class SpoolError(MailforwardError):
    """The spool could not store or read a message (disk full, I/O error, ...)."""


class SpoolNotFound(SpoolError):
    """No spooled message has this queue id (delivered, removed, or never spooled)."""


class SpoolCorrupt(SpoolError):
    """The spool file did not parse; it has been moved to ``corrupt/``."""


class SpoolMissing(SpoolError):
    """The spool directory does not exist (and was not to be created)."""


class InvalidQueueId(SpoolError):
    """A queue id with characters other than [A-Z0-9]: refused so no path escapes."""


def validate_queue_id(queue_id: str) -> str:
    """The queue id itself, or :class:`InvalidQueueId`: it becomes a file name."""
    if not QUEUE_ID_RE.fullmatch(queue_id):
        raise InvalidQueueId(f"invalid queue id {queue_id!r}")
    return queue_id


@dataclass(frozen=True)
class SpoolEntry:
    """A spooled message's envelope: what listing needs, without the content."""

    queue_id: str
    sender: str  # "" is the null sender
    pending: tuple[str, ...]  # still to deliver
    delivered: tuple[str, ...]  # accepted by their destination: never send again
    failed: tuple[str, ...]  # permanently failed and already bounced
    created: float
    attempts: int
    next_attempt: float
    errors: Mapping[str, str]  # last error text per pending recipient
    size: int
    client_ip: str = ""
    smtputf8: bool = False
    original_sender: str = ""  # before SRS: where a DSN goes
    aliases: Mapping[str, str] = field(default_factory=dict)  # destination -> address used
    body: str = ""  # as :class:`.base.Message`: BODY declared at MAIL
    dsn_ret: str = ""  # RFC 3461 RET
    dsn_envid: str = ""  # RFC 3461 ENVID, xtext
    dsn: Mapping[str, RecipientDsn] = field(default_factory=dict)  # destination -> NOTIFY, ORCPT
    # An attempt past its final dot may still be answered until then: no retry before.
    busy_until: float = 0.0
    original_queue_id: str = ""  # a DSN of ours: the queue id of the message it reports on

    @property
    def bounce_to(self) -> str:
        return self.original_sender or self.sender

    def alias_of(self, destination: str) -> str:
        """As :meth:`.base.Message.alias_of`: what a DSN may call ``destination``."""
        return self.aliases.get(destination, destination)

    def dsn_of(self, destination: str) -> RecipientDsn:
        """As :meth:`.base.Message.dsn_of`: the RCPT's NOTIFY and ORCPT for ``destination``."""
        return self.dsn.get(destination, NO_DSN_PARAMETERS)


@dataclass(frozen=True)
class SpooledMessage(SpoolEntry):
    """A spooled message with its content."""

    content: bytes = field(default=b"", repr=False)

    def message(self) -> Message:
        """The message to attempt again: addressed to the pending recipients only."""
        return Message(self.queue_id, self.sender, self.pending, self.content,
                       self.client_ip, self.smtputf8, self.original_sender, self.aliases,
                       body=self.body, dsn_ret=self.dsn_ret, dsn_envid=self.dsn_envid,
                       dsn=self.dsn, original_queue_id=self.original_queue_id)


Entries = list[SpoolEntry]  # spelled out here: inside Spool, ``list`` is the method
E = TypeVar("E", bound=SpoolEntry)
_ENVELOPE_FIELDS = tuple(f.name for f in fields(SpoolEntry))


def _envelope(entry: SpoolEntry) -> SpoolEntry:
    """The envelope alone (no content kept in the index)."""
    if type(entry) is SpoolEntry:
        return entry
    return SpoolEntry(**{name: getattr(entry, name) for name in _ENVELOPE_FIELDS})


def _stamp(st: os.stat_result) -> Stamp:
    return (st.st_ino, st.st_size, st.st_mtime_ns)


class Spool:
    """A directory of spooled messages; see the module docstring for the format.

    The directory is created unless ``create`` is False; ``read_only``
    (which implies it) changes nothing on disk at all.  Either raises
    :class:`SpoolMissing` when the directory does not exist.
    """

    def __init__(self, directory: Path, *, create: bool = True, read_only: bool = False) -> None:
        self.directory = Path(directory)
        self.corrupt_directory = self.directory / CORRUPT_DIR
        self.read_only = read_only
        try:
            if create and not read_only:
                self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            elif not self.directory.exists():
                raise SpoolMissing(f"spool directory {self.directory} does not exist")
            if not self.directory.is_dir():
                raise NotADirectoryError(errno.ENOTDIR, "not a directory", str(self.directory))
        except OSError as e:
            raise SpoolError(f"spool directory {self.directory}: {e}") from e
        self._memory = threading.Lock()  # guards the in-memory state below (spool I/O runs in threads)
        self._index: dict[str, tuple[SpoolEntry, Stamp]] = {}
        self._indexing = False  # from the first listing on: a process that only puts keeps none
        self._scanned: tuple[int, bool] | None = None  # directory mtime at the last scan, trusted
        self._unrecorded: dict[str, set[str]] = {}  # delivered, but the disk would not take it
        self._postponed: dict[str, float] = {}  # next attempt the disk would not take
        self._in_flight: set[str] = set()  # queue ids an attempt past its final dot still holds
        self._reported: set[str] = set()  # queue ids whose disk error is in the log
        if not read_only:
            self._clean_temp_files()

    # --- public API

    def put(self, message: Message, pending: Sequence[str], now: float, next_attempt: float,
            *, attempts: int = 1, errors: Mapping[str, str] | None = None,
            busy_until: float = 0.0) -> SpooledMessage:
        """Store ``message`` durably for its ``pending`` recipients.

        The others in ``message.recipients`` are recorded as delivered.
        ``attempts`` counts the pass-through attempt that failed; ``errors``
        is why, per recipient.  ``busy_until``: an attempt past its final dot
        may still be answered until then (no retry before; see
        :meth:`settle`).  A queue id already in the spool is refused rather
        than overwritten: that would lose a message.
        """
        validate_queue_id(message.queue_id)
        pending_set = set(pending)
        if not pending_set:
            raise ValueError("nothing pending: a delivered message is not spooled")
        if not pending_set <= set(message.recipients):
            raise ValueError("pending recipients must be among the message's recipients")
        spooled = SpooledMessage(
            queue_id=message.queue_id, sender=message.sender,
            pending=tuple(r for r in _unique(message.recipients) if r in pending_set),
            delivered=tuple(r for r in _unique(message.recipients) if r not in pending_set),
            failed=(), created=now, attempts=attempts, next_attempt=next_attempt,
            errors={r: e for r, e in (errors or {}).items() if r in pending_set},
            size=len(message.content), client_ip=message.client_ip,
            original_sender=message.original_sender, aliases=dict(message.aliases),
            smtputf8=message.smtputf8, body=message.body, dsn_ret=message.dsn_ret,
            dsn_envid=message.dsn_envid, dsn=dict(message.dsn), content=bytes(message.content),
            busy_until=busy_until, original_queue_id=message.original_queue_id)
        self._write(spooled, exclusive=True)
        return spooled

    def get(self, queue_id: str) -> SpooledMessage:
        """The message with its content; :class:`SpoolNotFound` if there is none.

        Read from the file (and the index refreshed from it), with what this
        process remembers but could not write (:meth:`remember_delivered`).
        """
        entry = self._read(self._path(queue_id), with_content=True)
        assert isinstance(entry, SpooledMessage)
        return self._overlaid(entry)

    def list(self) -> Entries:
        """Every spooled envelope, soonest next attempt first, from the index.

        Only files that are new or changed since the last listing are read,
        and never their content.
        """
        self._sync()
        with self._memory:
            entries = [self._overlaid(entry) for entry, _ in self._index.values()]
        entries.sort(key=lambda e: (e.next_attempt, e.created, e.queue_id))
        return entries

    def due(self, now: float) -> Entries:
        """The envelopes whose next attempt is at or before ``now``."""
        return [e for e in self.list() if e.next_attempt <= now]

    def mark_delivered(self, queue_id: str, recipients: Sequence[str]) -> SpooledMessage:
        """Record that ``recipients`` accepted the message; durable when it returns.

        After a restart a delivered recipient is never pending again, so the
        message is never sent twice to a destination that accepted it.
        Recipients that are not pending are ignored (idempotent).  Delivery
        code calls it through :func:`record_delivery`, which remembers what
        the disk would not take.
        """
        done = set(recipients)
        return self._update(queue_id, lambda m: replace(
            m, pending=tuple(r for r in m.pending if r not in done),
            delivered=m.delivered + tuple(r for r in m.pending if r in done),
            errors={r: e for r, e in m.errors.items() if r not in done}))

    def remember_delivered(self, queue_id: str, recipients: Iterable[str]) -> bool:
        """Delivered, but not on disk: never pending again while this process lives.

        Every envelope this Spool hands out shows ``recipients`` delivered;
        the next successful write of the message stores it.  True the first
        time this message has something to remember (log the disk error once).
        """
        with self._memory:
            first = queue_id not in self._unrecorded
            self._unrecorded.setdefault(queue_id, set()).update(recipients)
        return first

    def report_error(self, queue_id: str, error: SpoolError, what: str) -> None:
        """Log a disk error about a message: at error level the first time, then at debug.

        The operator must see that the spool cannot be written; a line on
        every retry pass of every message would bury everything else.
        """
        with self._memory:
            first = queue_id not in self._reported
            self._reported.add(queue_id)
        log.log(logging.ERROR if first else logging.DEBUG, "%s: %s: %s", queue_id, what, error)

    def postpone(self, queue_id: str, next_attempt: float) -> None:
        """A next attempt time that could not be written: honoured in memory."""
        with self._memory:
            self._postponed[queue_id] = next_attempt

    def mark_in_flight(self, queue_id: str) -> None:
        """An attempt past its final dot still runs in this process: the scheduler waits."""
        with self._memory:
            self._in_flight.add(queue_id)

    def clear_in_flight(self, queue_id: str) -> None:
        with self._memory:
            self._in_flight.discard(queue_id)

    def in_flight(self, queue_id: str) -> bool:
        with self._memory:
            return queue_id in self._in_flight

    def settle(self, queue_id: str, errors: Mapping[str, str]) -> SpooledMessage | None:
        """The attempt that held the message (``busy_until``) is over: due again as scheduled.

        ``errors`` are its last errors.  A message with nothing pending any
        more is removed; then None.
        """
        def change(m: SpooledMessage) -> SpooledMessage:
            merged = {**m.errors, **errors}
            return replace(m, busy_until=0.0,
                           errors={r: e for r, e in merged.items() if r in m.pending})
        updated = self._update(queue_id, change)
        if updated.pending:
            return updated
        self.remove(queue_id)
        return None

    def mark_failed(self, queue_id: str, failures: Mapping[str, str]) -> SpooledMessage:
        """Record permanent failures (already bounced): no longer pending, never retried."""
        return self._update(queue_id, lambda m: replace(
            m, pending=tuple(r for r in m.pending if r not in failures),
            failed=m.failed + tuple(r for r in m.pending if r in failures),
            errors={r: e for r, e in m.errors.items() if r not in failures}))

    def reschedule(self, queue_id: str, next_attempt: float, attempts: int,
                   errors: Mapping[str, str]) -> SpooledMessage:
        """Set the next attempt time and attempt count; ``errors`` update the last errors."""
        def change(m: SpooledMessage) -> SpooledMessage:
            merged = {**m.errors, **errors}
            return replace(m, next_attempt=next_attempt, attempts=attempts,
                           errors={r: e for r, e in merged.items() if r in m.pending})
        return self._update(queue_id, change)

    def flush(self, now: float) -> int:
        """Make every message due at ``now`` (``postqueue -f``); returns how many."""
        count = 0
        for entry in self.list():
            if entry.next_attempt > now:
                try:
                    self._update(entry.queue_id, lambda m: replace(m, next_attempt=now))
                except SpoolNotFound:
                    continue
            count += 1
        return count

    def remove(self, queue_id: str) -> None:
        """Delete a message durably (so it cannot reappear and be sent again)."""
        path = self._path(queue_id)
        with self._locked():
            try:
                os.unlink(path)
            except FileNotFoundError as e:
                self._forget(queue_id)
                raise SpoolNotFound(f"{queue_id}: not in the spool") from e
            except OSError as e:
                raise SpoolError(f"{queue_id}: cannot remove: {e}") from e
            self._forget(queue_id)
            try:
                self._fsync_directory(self.directory)
            except OSError as e:
                raise SpoolError(f"{queue_id}: cannot remove: {e}") from e

    # --- files

    def _path(self, queue_id: str) -> Path:
        return self.directory / validate_queue_id(queue_id)

    def _update(self, queue_id: str,
                change: Callable[[SpooledMessage], SpooledMessage]) -> SpooledMessage:
        """Read, change and rewrite one message under the spool lock."""
        with self._locked():
            updated = change(self.get(queue_id))
            self._write(updated, exclusive=False)
            return updated

    def _write(self, message: SpooledMessage, *, exclusive: bool) -> None:
        """Write atomically: temp file, fsync, rename (or link if new), fsync the directory."""
        self._check_writable()
        final = self._path(message.queue_id)
        temp = self.directory / (f"{TEMP_PREFIX}{message.queue_id}-{os.getpid()}-"
                                 f"{secrets.token_hex(4)}")
        data = _encode_header(message) + message.content
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                _write_all(fd, data)
                os.fsync(fd)
                stamp = _stamp(os.fstat(fd))  # a rename or link keeps inode, size and mtime
            finally:
                os.close(fd)
            if exclusive:
                os.link(temp, final)  # fails with EEXIST instead of overwriting
                os.unlink(temp)
            else:
                os.replace(temp, final)
            self._fsync_directory(self.directory)
        except OSError as e:
            _unlink_quietly(temp)
            if exclusive and e.errno == errno.EEXIST:
                raise SpoolError(f"{message.queue_id}: already in the spool") from e
            raise SpoolError(f"{message.queue_id}: cannot write spool file: {e}") from e
        with self._memory:
            if self._indexing:
                self._index[message.queue_id] = (_envelope(message), stamp)
            self._postponed.pop(message.queue_id, None)
            remembered = self._unrecorded.get(message.queue_id)
            if remembered is not None:
                remembered.difference_update(message.delivered)
                if not remembered:
                    del self._unrecorded[message.queue_id]

    # --- the index

    def _read(self, path: Path, *, with_content: bool) -> SpoolEntry:
        """:meth:`_load`, and the index updated with what was read."""
        try:
            entry, stamp = self._load(path, with_content=with_content)
        except SpoolNotFound:
            self._forget(path.name)
            raise
        with self._memory:
            if self._indexing:
                self._index[entry.queue_id] = (_envelope(entry), stamp)
        return entry

    def _forget(self, queue_id: str) -> None:
        with self._memory:
            self._index.pop(queue_id, None)
            self._unrecorded.pop(queue_id, None)
            self._postponed.pop(queue_id, None)
            self._reported.discard(queue_id)

    def _overlaid(self, entry: E) -> E:
        """``entry`` with what this process knows and the disk does not (yet)."""
        done = self._unrecorded.get(entry.queue_id)
        later = self._postponed.get(entry.queue_id)
        if done:
            entry = replace(entry, pending=tuple(r for r in entry.pending if r not in done),
                            delivered=entry.delivered + tuple(r for r in entry.pending
                                                              if r in done),
                            errors={r: e for r, e in entry.errors.items() if r not in done})
        if later is not None and later > entry.next_attempt:
            entry = replace(entry, next_attempt=later)
        return entry

    def _sync(self) -> None:
        """Bring the index up to date with the directory: read new and changed files only."""
        try:
            mtime = os.stat(self.directory).st_mtime_ns
            started = time.time()
            if self._scanned == (mtime, True):
                return  # nothing was created, renamed or removed since a scan we can trust
            with os.scandir(self.directory) as found:
                names = [(d.name, d) for d in found if QUEUE_ID_RE.fullmatch(d.name)]
        except OSError as e:
            raise SpoolError(f"spool directory {self.directory}: {e}") from e
        with self._memory:
            self._indexing = True
            known = {name: stamp for name, (_, stamp) in self._index.items()}
        seen: set[str] = set()
        for name, dirent in names:
            try:
                stamp = _stamp(dirent.stat(follow_symlinks=False))
            except FileNotFoundError:
                continue  # removed meanwhile
            except OSError as e:
                raise SpoolError(f"{name}: cannot read spool file: {e}") from e
            if known.get(name) == stamp:
                seen.add(name)
                continue
            try:
                self._read(self.directory / name, with_content=False)
            except (SpoolNotFound, SpoolCorrupt):
                continue  # removed meanwhile, or moved aside and logged
            seen.add(name)
        with self._memory:
            for name in known.keys() - seen:  # gone, unless rewritten by us during the scan
                if name in self._index and self._index[name][1] == known[name]:
                    del self._index[name]
                    self._unrecorded.pop(name, None)
                    self._postponed.pop(name, None)
        self._scanned = (mtime, started - mtime / 1e9 > DIRECTORY_TICK)

    # --- files

    def _load(self, path: Path, *, with_content: bool) -> tuple[SpoolEntry, Stamp]:
        """Parse one spool file; a file that does not parse is moved aside."""
        try:
            with open(path, "rb") as f:
                header = f.readline(MAX_HEADER)
                st = os.fstat(f.fileno())
                actual = st.st_size - len(header)
                content = f.read() if with_content else b""
        except FileNotFoundError as e:
            raise SpoolNotFound(f"{path.name}: not in the spool") from e
        except OSError as e:
            raise SpoolError(f"{path.name}: cannot read spool file: {e}") from e
        try:
            entry = _decode_header(header, path.name)
            if actual != entry.size or (with_content and len(content) != entry.size):
                raise ValueError(f"content is {actual} bytes, envelope says {entry.size}")
        except ValueError as e:
            self._move_aside(path, str(e))
            self._forget(path.name)
            where = "left in place" if self.read_only else "moved aside"
            raise SpoolCorrupt(f"{path.name}: corrupt spool file {where}: {e}") from e
        if with_content:
            return SpooledMessage(**vars(entry), content=content), _stamp(st)
        return entry, _stamp(st)

    def _move_aside(self, path: Path, reason: str) -> None:
        """Keep a corrupt file for the operator in ``corrupt/``; never delete mail."""
        if self.read_only:
            log.warning("%s: corrupt spool file (%s), skipped", path.name, reason)
            return
        try:
            self.corrupt_directory.mkdir(mode=0o700, exist_ok=True)
            target = self.corrupt_directory / path.name
            n = 0
            while target.exists():
                n += 1
                target = self.corrupt_directory / f"{path.name}.{n}"
            os.replace(path, target)
            self._fsync_directory(self.directory)
        except FileNotFoundError:
            return  # moved or removed by someone else meanwhile
        except OSError as e:
            log.error("%s: corrupt spool file (%s), cannot move it aside: %s",
                      path.name, reason, e)
            return
        log.error("%s: corrupt spool file (%s), moved to %s", path.name, reason, target)

    def _clean_temp_files(self) -> None:
        """Remove temp files a crashed writer left; a live writer's are left alone."""
        try:
            names = os.listdir(self.directory)
        except OSError as e:
            raise SpoolError(f"spool directory {self.directory}: {e}") from e
        for name in names:
            if name.startswith(TEMP_PREFIX) and _is_stale_temp(self.directory / name):
                log.warning("removing leftover spool temp file %s", name)
                _unlink_quietly(self.directory / name)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """An exclusive flock on ``.lock``: serialises read-modify-write across processes."""
        self._check_writable()
        try:
            fd = os.open(self.directory / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise SpoolError(f"spool lock: {e}") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _check_writable(self) -> None:
        if self.read_only:
            raise SpoolError(f"spool directory {self.directory}: opened read-only")

    @staticmethod
    def _fsync_directory(directory: Path) -> None:
        """Make a rename or unlink in ``directory`` durable (raises OSError)."""
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def record_delivery(spool: Spool, queue_id: str, recipients: Sequence[str]) -> bool:
    """Record that ``recipients`` have the message; False if only memory could keep it.

    Never raises for a disk error: the destination has the message whatever
    the disk does, so the delivery is remembered in memory (never sent
    again while we run) and the disk error logged, once per message.  A
    message no longer in the spool (deleted by the operator) has nothing to
    record.
    """
    try:
        spool.mark_delivered(queue_id, recipients)
        return True
    except SpoolNotFound:
        return False
    except SpoolError as error:
        spool.remember_delivered(queue_id, recipients)
        spool.report_error(queue_id, error, f"delivered to {','.join(recipients)}, but the spool "
                           "cannot record it (kept in memory: it will not be sent again)")
        return False


# --- encoding


def _encode_header(message: SpoolEntry) -> bytes:
    header: dict[str, Any] = {
        "version": FORMAT_VERSION, "queue_id": message.queue_id, "sender": message.sender,
        "pending": list(message.pending), "delivered": list(message.delivered),
        "failed": list(message.failed), "created": message.created,
        "attempts": message.attempts, "next_attempt": message.next_attempt,
        "errors": dict(message.errors), "size": message.size,
        "client_ip": message.client_ip, "smtputf8": message.smtputf8,
        "original_sender": message.original_sender, "aliases": dict(message.aliases),
        "body": message.body, "dsn_ret": message.dsn_ret, "dsn_envid": message.dsn_envid,
        "dsn": {dest: {"notify": d.notify, "orcpt": d.orcpt} for dest, d in message.dsn.items()},
    }
    if message.busy_until:
        header["busy_until"] = message.busy_until
    if message.original_queue_id:
        header["original_queue_id"] = message.original_queue_id
    # ensure_ascii: the line can never contain a raw newline or invalid UTF-8
    return json.dumps(header, ensure_ascii=True, separators=(",", ":")).encode("ascii") + b"\n"


def _decode_header(line: bytes, name: str) -> SpoolEntry:
    """The envelope from the header line, or ValueError on anything unexpected."""
    if not line.endswith(b"\n"):
        raise ValueError("no complete envelope line")
    try:
        data: Any = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"envelope is not JSON: {e}") from e
    if not isinstance(data, dict) or data.get("version") != FORMAT_VERSION:
        raise ValueError("unknown envelope format")
    if data.get("queue_id") != name:
        raise ValueError(f"envelope is for queue id {data.get('queue_id')!r}")
    return SpoolEntry(
        queue_id=name, sender=_field(data, "sender", str),
        pending=_addresses(data, "pending"), delivered=_addresses(data, "delivered"),
        failed=_addresses(data, "failed"), created=_number(data, "created"),
        attempts=_field(data, "attempts", int), next_attempt=_number(data, "next_attempt"),
        errors=_strings(data, "errors"), size=_field(data, "size", int),
        client_ip=_field(data, "client_ip", str), smtputf8=_field(data, "smtputf8", bool),
        original_sender=str(data.get("original_sender", "")),
        aliases=_strings(data, "aliases", missing={}),
        body=_choice(data, "body", ("", "7BIT", "8BITMIME")),
        dsn_ret=_choice(data, "dsn_ret", ("", "FULL", "HDRS")),
        dsn_envid=_field(data, "dsn_envid", str) if "dsn_envid" in data else "",
        dsn=_recipient_dsn(data),
        busy_until=_number(data, "busy_until") if "busy_until" in data else 0.0,
        original_queue_id=_original_queue_id(data))


T = TypeVar("T")


def _field(data: dict[str, Any], key: str, kind: type[T]) -> T:
    value = data.get(key)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValueError(f"bad field {key!r}")
    return value


def _number(data: dict[str, Any], key: str) -> float:
    value = data.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"bad field {key!r}")
    return float(value)


def _addresses(data: dict[str, Any], key: str) -> tuple[str, ...]:
    value = data.get(key)
    if not isinstance(value, list) or not all(isinstance(a, str) for a in value):
        raise ValueError(f"bad field {key!r}")
    return tuple(value)


def _strings(data: dict[str, Any], key: str,
             missing: dict[str, str] | None = None) -> dict[str, str]:
    """A JSON object of strings (``errors``, ``aliases``), or ValueError.

    ``missing`` is the value when the key is absent: a field added after
    files were written (``aliases``) must not make those files corrupt.
    """
    value = data.get(key, missing)
    if not (isinstance(value, dict) and all(isinstance(v, str) for v in value.values())):
        raise ValueError(f"bad field {key!r}")
    return value


def _choice(data: dict[str, Any], key: str, allowed: tuple[str, ...]) -> str:
    """One of ``allowed``; "" when the key is absent (files written before it existed)."""
    value = data.get(key, "")
    if value not in allowed:
        raise ValueError(f"bad field {key!r}")
    return str(value)


def _original_queue_id(data: dict[str, Any]) -> str:
    """A DSN's ``original_queue_id``: absent (ordinary mail, older files) is ""."""
    value = data.get("original_queue_id", "")
    if not isinstance(value, str) or (value and not QUEUE_ID_RE.fullmatch(value)):
        raise ValueError("bad field 'original_queue_id'")
    return value


def _recipient_dsn(data: dict[str, Any]) -> dict[str, RecipientDsn]:
    """``dsn``: destination -> {"notify": ..., "orcpt": ...}; empty in older files."""
    value = data.get("dsn", {})
    if not isinstance(value, dict):
        raise ValueError("bad field 'dsn'")
    result: dict[str, RecipientDsn] = {}
    for dest, params in value.items():
        if not isinstance(params, dict):
            raise ValueError("bad field 'dsn'")
        notify, orcpt = params.get("notify", ""), params.get("orcpt", "")
        if not (isinstance(notify, str) and isinstance(orcpt, str)):
            raise ValueError("bad field 'dsn'")
        result[dest] = RecipientDsn(notify, orcpt)
    return result


# --- small helpers


def _unique(items: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(items))


def _write_all(fd: int, data: bytes) -> None:
    """os.write may write less than asked (signals, some filesystems): loop."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        if written <= 0:  # never for regular files, but never loop forever either
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        view = view[written:]


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _is_stale_temp(path: Path) -> bool:
    """A temp file whose writer is gone (or that is old): safe to remove."""
    parts = path.name[len(TEMP_PREFIX):].split("-")
    try:
        pid = int(parts[1])
        age = time.time() - path.stat().st_mtime
    except (IndexError, ValueError):
        return True
    except OSError:
        return False  # gone already
    return age > STALE_TEMP_AGE or not _process_alive(pid)


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True  # another Spool object or thread of ours may be writing it
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
