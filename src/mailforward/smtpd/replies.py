"""Every SMTP reply the server sends, in one table.

Texts follow Postfix's, so operators' log-reading habits and the reference
stack's recorded replies (shared/peer/peer-results.json) carry over.  Each
error has an RFC 3463 enhanced status code.  Exceptions are mapped to
replies here and nowhere else (:func:`reply_for_error`).
"""

from __future__ import annotations

from ..errors import DmarcRejected, SpfRejected, TemporaryLookupError
from ..reply import OK, Reply, printable, queued

# Re-exported: the value type and the acknowledgement delivery also needs live in
# ``mailforward.reply``, which ``delivery/`` imports instead of this module.
__all__ = ["OK", "Reply", "printable", "queued"]


# --- success (OK and queued() are in ``mailforward.reply``)
SENDER_OK = Reply(250, "2.1.0", "Ok")
RECIPIENT_OK = Reply(250, "2.1.5", "Ok")
START_DATA = Reply(354, "", "End data with <CR><LF>.<CR><LF>")
BYE = Reply(221, "2.0.0", "Bye")
READY_FOR_TLS = Reply(220, "2.0.0", "Ready to start TLS")


# --- policy rejections (texts are Postfix's; ``.about(address)`` adds the address)
RELAY_DENIED = Reply(554, "5.7.1", "Relay access denied",
                     "relay_denied")
USER_UNKNOWN = Reply(550, "5.1.1", "Recipient address rejected: User unknown",
                     "unknown_recipient")
FORGED_LOCAL_SENDER = Reply(554, "5.7.1", "Sender address rejected: forged local sender",
                            "forged_local_sender")
SRS_SENDER_INBOUND = Reply(554, "5.7.1", "Sender address rejected: SRS sender not accepted inbound",
                           "srs_sender_inbound")
INVALID_HELO = Reply(501, "5.5.2", "Helo command rejected: Invalid name",
                     "invalid_helo")
TEMPORARY_LOOKUP_FAILURE = Reply(451, "4.3.0", "Temporary lookup failure",
                                 "lookup_failure")
ALIAS_LOOP = Reply(550, "5.4.6", "Recipient address rejected: alias expansion loop",
                   "alias_loop")
TOO_MANY_HOPS = Reply(554, "5.4.6", "Error: too many hops",
                      "too_many_hops")

# --- protocol errors
NEED_HELO = Reply(503, "5.5.1", "Error: send HELO/EHLO first")
NEED_MAIL = Reply(503, "5.5.1", "Error: need MAIL command")
NEED_RCPT = Reply(503, "5.5.1", "Error: need RCPT command")
NO_VALID_RECIPIENTS = Reply(554, "5.5.1", "Error: no valid recipients",
                            "no_valid_recipients")
NESTED_MAIL = Reply(503, "5.5.1", "Error: nested MAIL command")
UNRECOGNIZED = Reply(500, "5.5.2", "Error: command not recognized")
NOT_IMPLEMENTED = Reply(502, "5.5.1", "Error: command not implemented")
VRFY_DISABLED = Reply(502, "5.5.1", "VRFY command is disabled")
AUTH_NOT_ENABLED = Reply(503, "5.5.1", "Error: authentication not enabled")
ETRN_REFUSED = Reply(459, "4.3.0", "service unavailable")
BAD_SYNTAX = Reply(500, "5.5.2", "Error: bad syntax")
LINE_TOO_LONG = Reply(500, "5.5.2", "Error: command line too long")
BARE_NEWLINE = Reply(521, "5.5.2", "Error: bare <LF> received",
                     "bare_newline")
HELO_SYNTAX = Reply(501, "5.5.4", "Syntax: HELO hostname")
EHLO_SYNTAX = Reply(501, "5.5.4", "Syntax: EHLO hostname")
MAIL_SYNTAX = Reply(501, "5.5.4", "Syntax: MAIL FROM:<address>")
RCPT_SYNTAX = Reply(501, "5.5.4", "Syntax: RCPT TO:<address>")
BAD_SENDER_SYNTAX = Reply(501, "5.1.7", "Bad sender address syntax",
                          "bad_sender_syntax")
BAD_RECIPIENT_SYNTAX = Reply(501, "5.1.3", "Bad recipient address syntax",
                             "bad_recipient_syntax")
BAD_PARAMETER = Reply(555, "5.5.4", "Unsupported option",
                      "bad_parameter")
SMTPUTF8_REQUIRED = Reply(553, "5.6.7", "Error: SMTPUTF8 is required for this address",
                          "smtputf8_required")
UNFORWARDABLE_SENDER = Reply(553, "5.1.7", "Sender address rejected: cannot be forwarded",
                             "unforwardable_sender")
BARE_CARRIAGE_RETURN = Reply(521, "5.5.2", "Error: bare <CR> received",
                             "bare_newline")
ARGUMENT_NOT_ALLOWED = Reply(501, "5.5.4", "Syntax: command takes no argument")
BDAT_SYNTAX = Reply(501, "5.5.4", "Syntax: BDAT count [LAST]")
BDAT_EXPECTED = Reply(503, "5.5.1", "Error: BDAT in progress: only BDAT, RSET, NOOP or QUIT")
FORBIDDEN_COMMAND = Reply(221, "2.7.0", "Error: I can break rules, too. Goodbye.",
                          "non_smtp_command")


def chunk_received(size: int) -> Reply:
    return Reply(250, "2.0.0", f"Ok: {size} bytes")

# --- limits
MESSAGE_TOO_BIG_DECLARED = Reply(552, "5.3.4", "Message size exceeds fixed limit",
                                 "message_too_big")
MESSAGE_TOO_BIG = Reply(552, "5.3.4", "Error: message file too big",
                        "message_too_big")
TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Error: too many recipients",
                            "too_many_recipients")


def too_many_connections(hostname: str, ip: str) -> Reply:
    return Reply(421, "4.7.0", f"{hostname} Error: too many connections from {ip}",
                 "connection_limit")


# --- abuse limits (smtpd/abuse.py).  Postfix's anvil answers for the per-client rates
# (smtpd_client_message_rate_limit at MAIL, smtpd_client_recipient_rate_limit at RCPT);
# per sender and per alias in the same style.  All temporary: the sender retries later.
def client_message_rate(ip: str) -> Reply:
    return Reply(450, "4.7.1", f"Error: too much mail from {ip}", "client_message_rate")


def client_recipient_rate(ip: str) -> Reply:
    return Reply(450, "4.7.1", f"Error: too many recipients from {ip}", "client_recipient_rate")


SENDER_MESSAGE_RATE = Reply(450, "4.7.1", "Sender address rejected: too much mail from this sender",
                            "sender_message_rate")
# 452 at RCPT: this recipient later, the others of the message now (as for 452 4.5.3).
ALIAS_MESSAGE_RATE = Reply(452, "4.7.1", "Recipient address rejected: too much mail for this "
                           "recipient, try again later", "alias_message_rate")
# [limits] redis_failure = "fail_closed" while the shared store does not answer.
LIMITS_UNAVAILABLE = Reply(451, "4.3.0", "Temporary lookup failure", "limits_unavailable")


# --- bans (tables/bans.py): Postfix's access(5) REJECT wording; the admin's reason is not sent.
def banned_client(ip: str) -> Reply:
    return Reply(554, "5.7.1", f"<unknown[{ip}]>: Client host rejected: Access denied",
                 "banned_client")


BANNED_SENDER = Reply(554, "5.7.1", "Sender address rejected: Access denied", "banned_sender")
BANNED_ALIAS = Reply(554, "5.7.1", "Recipient address rejected: Access denied", "banned_alias")


def too_many_errors(hostname: str) -> Reply:
    return Reply(421, "4.7.0", f"{hostname} Error: too many errors")


def timeout_exceeded(hostname: str) -> Reply:
    return Reply(421, "4.4.2", f"{hostname} Error: timeout exceeded")


def shutting_down(hostname: str) -> Reply:
    """SIGTERM: a session between commands is told to come back later (RFC 3463 4.3.2)."""
    return Reply(421, "4.3.2", f"{hostname} Service shutting down")


# --- authentication policy (OpenDMARC's and policyd-spf's wording)
def dmarc_rejected(domain: str) -> Reply:
    return Reply(550, "5.7.1", f"rejected by DMARC policy for {domain}", "dmarc_reject")


def spf_rejected(domain: str) -> Reply:
    return Reply(550, "5.7.23", f"Message rejected due to: SPF fail - not authorized by {domain}",
                 "spf_fail")


# --- the From header policy (RFC 5322 3.6, RFC 7489 6.6.1; OpenDMARC's RejectMultiValueFrom)
FROM_MISSING = Reply(550, "5.7.1", "Message rejected: no From header",
                     "from_missing")
FROM_REPEATED = Reply(550, "5.7.1", "Message rejected: more than one From header",
                      "from_repeated")
FROM_NOT_ONE_MAILBOX = Reply(550, "5.7.1",
                             "Message rejected: From header is not exactly one valid mailbox",
                             "from_invalid")


def own_domain_unauthenticated(domain: str) -> Reply:
    """From names one of our domains, and the message did not pass DMARC for it."""
    return Reply(550, "5.7.1", f"Message rejected: From header in {domain} is not authenticated",
                 "own_domain_unauthenticated")


# --- failures of our own
INTERNAL_ERROR = Reply(451, "4.3.0", "Error: internal error, try again later",
                       "internal_error")


def reply_for_error(error: BaseException) -> Reply:
    """The single mapping from our exception types to SMTP replies.

    Anything we do not recognise is an internal error: a 451 that reveals no
    internal text, so the sender keeps the message and retries.
    """
    if isinstance(error, TemporaryLookupError):
        return TEMPORARY_LOOKUP_FAILURE
    if isinstance(error, DmarcRejected):
        return dmarc_rejected(error.domain)
    if isinstance(error, SpfRejected):
        return spf_rejected(error.domain)
    return INTERNAL_ERROR
