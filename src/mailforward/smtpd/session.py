"""What one SMTP connection knows: the client, and the transaction under way.

Plain data, shared by the engine (which fills in what the protocol says) and
the handler (which fills in what policy decided).  Nothing here talks to the
network or to a table.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..addresses import Address
from ..delivery.base import RecipientDsn

__all__ = ["ClientSession", "RecipientDsn", "Transaction"]


@dataclass
class ClientSession:
    """The client, from connect to QUIT; STARTTLS resets only ``host_name``."""

    client_ip: str = ""
    local_ip: str = ""
    in_mynetworks: bool = False
    admitted: bool = False  # counted by the connection limits, so to be released
    host_name: str = ""  # HELO/EHLO argument; "" until the client greets
    extended_smtp: bool = False
    tls: bool = False


@dataclass
class Transaction:
    """MAIL FROM to the end of DATA/BDAT (or RSET)."""

    sender: Address | None = None  # None: the null sender
    has_sender: bool = False
    mail_from: str = ""  # the sender as we write it (quoted where needed)
    forward_sender: str = ""  # what we forward with (SRS), decided at MAIL
    smtp_utf8: bool = False
    body: str = ""  # "", "7BIT" or "8BITMIME" (RFC 6152)
    dsn_ret: str = ""  # "", "FULL" or "HDRS" (RFC 3461)
    dsn_envid: str = ""  # xtext, as given
    rcpt_tos: list[str] = field(default_factory=list)
    destinations: list[str] = field(default_factory=list)
    aliases: dict[str, str] = field(default_factory=dict)  # destination -> RCPT address used
    dsn: dict[str, RecipientDsn] = field(default_factory=dict)  # destination -> its RCPT's DSN
