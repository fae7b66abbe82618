"""Prometheus metrics: what an operator graphs and alerts on.

One process-wide set of instruments on prometheus-client's default registry
(the library's own model).  The code that knows an outcome records it through
the small functions below; ``ops/health.py`` serves ``/metrics`` with
``/healthz`` and ``/readyz``.  Labels are small closed sets (outcomes, reason
names, query kinds, record types), never addresses or hosts, so the series
count stays bounded.

The instruments are created on first use, not at import: with several worker
processes ``serve`` first points ``PROMETHEUS_MULTIPROC_DIR`` at a directory
(prometheus-client decides how values are stored when it is imported), so
that the worker serving ``/metrics`` reports every worker's counts.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from prometheus_client import Counter, Gauge, Histogram

DATA_REPLY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Instruments(NamedTuple):
    connections: Counter
    refusals: Counter
    messages: Counter
    recipients: Counter
    data_reply_seconds: Histogram
    lookup_seconds: Histogram
    lookup_errors: Counter
    dns_seconds: Histogram
    dns_errors: Counter
    spool_messages: Gauge
    spool_oldest_seconds: Gauge
    store_errors: Counter
    duplicates: Counter
    ban_matches: Counter


@functools.cache
def instruments() -> Instruments:
    from prometheus_client import Counter, Gauge, Histogram

    return Instruments(
        connections=Counter("mailforward_connections", "SMTP connections, by result",
                            ["result"]),  # accepted | refused
        refusals=Counter("mailforward_refusals",
                         "Refused commands and messages, by stage and reason", ["stage", "reason"]),
        messages=Counter("mailforward_messages", "Messages at the end of DATA, by outcome",
                         ["outcome"]),  # accepted | refused | deferred | failed
        recipients=Counter("mailforward_recipients", "Delivery outcomes per recipient",
                           ["outcome"]),  # delivered | deferred | bounced
        data_reply_seconds=Histogram("mailforward_data_reply_seconds",
                                     "Seconds from the end of DATA to our reply",
                                     buckets=DATA_REPLY_BUCKETS),
        lookup_seconds=Histogram("mailforward_lookup_seconds", "Lookup table query time",
                                 ["query"]),
        lookup_errors=Counter("mailforward_lookup_errors", "Lookup tables that could not answer",
                              ["query"]),
        dns_seconds=Histogram("mailforward_dns_seconds", "DNS query time, by record type",
                              ["rdtype"]),
        dns_errors=Counter("mailforward_dns_errors",
                           "DNS queries with no answer (timeout, SERVFAIL)", ["rdtype"]),
        spool_messages=Gauge("mailforward_spool_messages", "Messages waiting in the spool",
                             multiprocess_mode="max"),
        spool_oldest_seconds=Gauge("mailforward_spool_oldest_age_seconds",
                                   "Age of the oldest spooled message", multiprocess_mode="max"),
        store_errors=Counter("mailforward_limits_store_errors",
                             "Checks the limits store could not answer, by check",
                             ["check"]),  # rate | duplicates
        duplicates=Counter("mailforward_duplicates_suppressed",
                           "Retried messages not forwarded again: whole messages, or destinations "
                           "left out of a message forwarded to the others", ["scope"]),
        ban_matches=Counter("mailforward_ban_matches", "Commands refused by a ban, by kind",
                            ["kind"]),
    )


def count_connection(result: str) -> None:
    instruments().connections.labels(result).inc()


def count_refusal(stage: str, reason: str) -> None:
    instruments().refusals.labels(stage, reason).inc()


def count_message(outcome: str, reply_seconds: float) -> None:
    metrics = instruments()
    metrics.messages.labels(outcome).inc()
    metrics.data_reply_seconds.observe(reply_seconds)


def count_store_error(check: str) -> None:
    instruments().store_errors.labels(check).inc()


def count_duplicates(scope: str, count: int = 1) -> None:
    if count:
        instruments().duplicates.labels(scope).inc(count)


def count_ban_match(kind: str) -> None:
    instruments().ban_matches.labels(kind).inc()


def count_recipients(outcome: str, count: int = 1) -> None:
    if count:
        instruments().recipients.labels(outcome).inc(count)


@contextmanager
def _timed(histogram: Histogram, errors: Counter, label: str) -> Iterator[None]:
    """Observe the time of the block under ``label``; count it as an error if it raises."""
    start = time.monotonic()
    try:
        yield
    except Exception:
        errors.labels(label).inc()
        raise
    finally:
        histogram.labels(label).observe(time.monotonic() - start)


def lookup_timer(query: str) -> AbstractContextManager[None]:
    metrics = instruments()
    return _timed(metrics.lookup_seconds, metrics.lookup_errors, query)


def dns_timer(rdtype: str) -> AbstractContextManager[None]:
    metrics = instruments()
    return _timed(metrics.dns_seconds, metrics.dns_errors, rdtype)


def record_spool(count: int, oldest_created: float | None, now: float) -> None:
    metrics = instruments()
    metrics.spool_messages.set(count)
    metrics.spool_oldest_seconds.set(0 if oldest_created is None
                                     else max(0.0, now - oldest_created))
