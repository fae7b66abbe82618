"""Thread pools for authentication work, one per kind of work (issue 13, "Executors by kind").

asyncio's default executor is shared: blocking file work (the spool's fsync
that gates the 250) waits in it behind whatever else is there.  Signing,
sealing and verifying therefore never use it:

* :data:`CPU` runs signing, sealing and the verification arithmetic
  (canonicalization, hashing, RSA).  RSA is on OpenSSL (``rsa_openssl``),
  which releases the GIL, so this work no longer stalls the event loop; the
  pool has one thread per CPU this process may use, more would only queue
  for the GIL in the pure-Python canonicalization.
* :data:`DNS` runs the blocking lookups of verification (SPF, DKIM and ARC
  key records, DMARC policy).  Its threads mostly wait on the network (a
  lookup can take the whole DNS timeout), so it has more of them, and a slow
  name server never holds up signing or the spool.

Both are bounded in threads; their queues are bounded by the callers: each
SMTP transaction waits for its own few tasks, and the number of concurrent
transactions is limited by the server's connection limits.

Each pool is created on first use in each process, so a worker process
forked after start-up makes its own instead of inheriting a pool whose
threads did not survive the fork.  Calls run in a copy of the caller's
context, as with ``asyncio.to_thread``.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

__all__ = ["CPU", "DNS", "DNS_WORKERS", "ON_LOOP_LIMIT", "WorkPool", "cpu_workers", "run_cpu",
           "run_dns"]

P = ParamSpec("P")
T = TypeVar("T")

DNS_WORKERS = 32
"""Concurrent blocking DNS lookups for verification (per process)."""

ON_LOOP_LIMIT = 64 * 1024
"""Messages up to this size are signed, sealed and verified on the event loop, not in
:data:`CPU`.  For them the work is well under a millisecond of Python around OpenSSL's
RSA -- less than a thread hand-off, and a Python-heavy pool thread holds the GIL that
every socket write of the loop must take back (measured at 1 KB: a quarter more signed
messages per second on the loop).  The loop stays responsive because each worker process
has its own, one per CPU.  Canonicalizing a big message is what would stall a loop, so
bigger messages still go to the pool."""


def cpu_workers() -> int:
    """The CPUs this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


class WorkPool:
    """A bounded ``ThreadPoolExecutor`` made on first use in each process."""

    def __init__(self, name: str, workers: int) -> None:
        self.name = name
        self.workers = workers
        self._lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None
        self._pid = 0

    def executor(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._executor is None or self._pid != os.getpid():
                self._executor = ThreadPoolExecutor(self.workers, thread_name_prefix=self.name)
                self._pid = os.getpid()
            return self._executor

    async def run(self, func: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """``func(*args, **kwargs)`` in this pool, awaited (``asyncio.to_thread``'s contract)."""
        loop = asyncio.get_running_loop()
        call = functools.partial(contextvars.copy_context().run, func, *args, **kwargs)
        return await loop.run_in_executor(self.executor(), call)


CPU = WorkPool("mailforward-auth-cpu", cpu_workers())
DNS = WorkPool("mailforward-auth-dns", DNS_WORKERS)


async def run_cpu(func: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
    """Signing, sealing, verification arithmetic: in :data:`CPU`."""
    return await CPU.run(func, *args, **kwargs)


async def run_dns(func: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
    """Blocking DNS for verification: in :data:`DNS`."""
    return await DNS.run(func, *args, **kwargs)
