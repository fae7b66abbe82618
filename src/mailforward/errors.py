"""The exception hierarchy: one root, so callers can catch everything of ours.

Errors are types; ``smtpd.replies`` is the one place that turns them into
SMTP replies, and the CLI turns them into messages with exit codes.
"""


class MailforwardError(Exception):
    """Root of every error this package raises on purpose."""


class ConfigError(MailforwardError):
    """The configuration is invalid; the message names the offending key."""


class TemporaryLookupError(MailforwardError):
    """A lookup table could not answer (server down, timeout, lost connection).

    Like Postfix's ``DICT_ERR_RETRY``: never to be confused with "not found".
    The SMTP layer answers it with ``451 4.3.0`` so no mail bounces during an
    outage.
    """


class AddressError(MailforwardError):
    """An address or domain is not syntactically valid."""


class AdminError(MailforwardError):
    """An admin operation was refused (duplicate, unknown domain, ...)."""


class DatabaseMissing(AdminError):
    """A read-only command found no database file: it creates none."""


class DatabasePermissionError(AdminError):
    """The database user lacks a privilege the operation needs; the message names it."""


class AuthenticationRefused(MailforwardError):
    """A message failed an authentication policy we enforce (DMARC p=reject, SPF -all).

    ``domain`` is the domain whose published policy refused it, for the reply.
    """

    def __init__(self, domain: str) -> None:
        super().__init__(domain)
        self.domain = domain


class DmarcRejected(AuthenticationRefused):
    """DMARC failed and the From domain publishes ``p=reject``: we do not forward spoofed mail."""


class SpfRejected(AuthenticationRefused):
    """SPF failed (``-all``) and ``[auth] reject_spf_fail`` is on."""
