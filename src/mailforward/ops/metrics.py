"""Prometheus metrics: what an operator graphs and alerts on.

One process-wide set of instruments on prometheus-client's default registry
(the library's own model).  The code that knows an outcome records it here;
``ops/health.py`` serves ``/metrics`` with ``/healthz`` and ``/readyz``.
Labels are small closed sets (outcomes, reason names, table and query kinds),
never addresses or hosts, so the series count stays bounded.

With several worker processes, prometheus-client's multiprocess mode
aggregates them (``PROMETHEUS_MULTIPROC_DIR``, set by the supervisor before
it starts the workers).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from prometheus_client import Counter, Gauge, Histogram

CONNECTIONS = Counter("mailforward_connections", "SMTP connections, by result",
                      ["result"])  # accepted | refused
REFUSALS = Counter("mailforward_refusals", "Refused commands and messages, by stage and reason",
                   ["stage", "reason"])
MESSAGES = Counter("mailforward_messages", "Messages at the end of DATA, by outcome",
                   ["outcome"])  # delivered | spooled | deferred | refused | failed
RECIPIENTS = Counter("mailforward_recipients", "Delivery outcomes per recipient",
                     ["outcome"])  # delivered | deferred | bounced
DATA_REPLY_SECONDS = Histogram(
    "mailforward_data_reply_seconds", "Seconds from the end of DATA to our reply",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
LOOKUP_SECONDS = Histogram("mailforward_lookup_seconds", "Lookup table query time, by query",
                           ["query"])
LOOKUP_ERRORS = Counter("mailforward_lookup_errors", "Lookup tables that could not answer",
                        ["query"])
DNS_SECONDS = Histogram("mailforward_dns_seconds", "DNS query time, by record type", ["rdtype"])
DNS_ERRORS = Counter("mailforward_dns_errors", "DNS queries with no answer (timeout, SERVFAIL)",
                     ["rdtype"])
SPOOL_MESSAGES = Gauge("mailforward_spool_messages", "Messages waiting in the spool",
                       multiprocess_mode="max")
SPOOL_OLDEST_SECONDS = Gauge("mailforward_spool_oldest_age_seconds",
                             "Age of the oldest spooled message", multiprocess_mode="max")


@contextmanager
def timed(histogram: Histogram, errors: Counter, label: str) -> Iterator[None]:
    """Observe the time of the block under ``label``; count it as an error if it raises."""
    start = time.monotonic()
    try:
        yield
    except Exception:
        errors.labels(label).inc()
        raise
    finally:
        histogram.labels(label).observe(time.monotonic() - start)


def record_spool(count: int, oldest_created: float | None, now: float) -> None:
    SPOOL_MESSAGES.set(count)
    SPOOL_OLDEST_SECONDS.set(0 if oldest_created is None else max(0.0, now - oldest_created))
