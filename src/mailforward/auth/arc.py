"""ARC sealing (RFC 8617) of forwarded mail.

A forwarder breaks SPF (new envelope) and sometimes DKIM (changed headers);
ARC lets the next receiver see what *we* verified before we touched the
message.  A message without ARC fields starts a chain (``cv=none``): its
set is built by ``signing.arc_set`` from the message parsed once for all
its signatures, the ARC-Authentication-Results being the
Authentication-Results we wrote.  A message continuing a chain goes to
dkimpy's ``arc_sign``: it copies our ``Authentication-Results`` (matched by
authserv-id) into ARC-Authentication-Results, takes the chain validation
state from its ``arc=`` result, and adds ARC-Message-Signature and ARC-Seal
with the next instance number: an intact chain is continued (``cv=pass``),
a broken one sealed with ``cv=fail``.

dkimpy seals :func:`~mailforward.headerfields.dkimpy_view` (its parser
refuses obsolete header syntax); ARC canonicalizes relaxed only, so the seal
is valid for the original bytes, which are what we send.

Either way the two RSA signatures (ARC-Message-Signature and ARC-Seal) are
OpenSSL's (``rsa_openssl``), with the key parsed once when
it was loaded (``DkimKey.private_pem`` is a ``PreparedRsaPem``).
"""

from __future__ import annotations

import logging

import dkim  # type: ignore[import-untyped]

from ..config import ArcSettings
from ..errors import ConfigError
from ..headerfields import dkimpy_view
from .dkim import DkimConfig, DkimKey, load_key
from .signing import SigningInput, arc_set, signs_here

log = logging.getLogger("mailforward.arc")


class ArcSealer:
    """Seals messages under one key; a failure never stops delivery (counted, logged)."""

    def __init__(self, key: DkimKey, authserv_id: str) -> None:
        self.key = key
        self.authserv_id = authserv_id
        self.sealing_failures = 0

    def seal(self, message: bytes, parsed: SigningInput | None = None,
             results: bytes | None = None) -> bytes:
        """The ARC set to prepend to ``message``; b"" if it cannot be sealed.

        With ``parsed`` (the message parsed for signing) and ``results`` (the
        value of the Authentication-Results field we prepended), a first seal
        is made by ``signing.arc_set`` without dkimpy re-reading the message;
        a message continuing a chain goes to dkimpy's ``arc_sign``.
        """
        if parsed is not None and results is not None and signs_here(self.key.private_pem) \
                and not parsed.has_arc_fields():
            return self._first_seal(parsed, results)
        try:
            headers = dkim.arc_sign(dkimpy_view(message), self.key.selector.encode(),
                                    self.key.domain.encode(), self.key.private_pem,
                                    self.authserv_id.encode())
        except Exception as e:  # dkimpy raises many types; none may stop delivery
            return self._failed(e)
        if not headers:
            self.sealing_failures += 1
            log.error("ARC sealing skipped: no Authentication-Results for %s", self.authserv_id)
        return b"".join(_crlf(h) for h in headers)

    def _first_seal(self, parsed: SigningInput, results: bytes) -> bytes:
        try:
            return arc_set(parsed, self.key.domain, self.key.selector, self.key.private_pem,
                           results)
        except Exception as e:  # no failure may stop delivery
            return self._failed(e)

    def _failed(self, error: Exception) -> bytes:
        self.sealing_failures += 1
        log.error("ARC sealing with %s failed (%s); sending without a seal",
                  self.key.name, type(error).__name__)
        return b""


def _crlf(header: bytes) -> bytes:
    return header.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n").rstrip(b"\r\n") + b"\r\n"


def sealer_from_settings(arc: ArcSettings, dkim_config: DkimConfig | None,
                         authserv_id: str) -> ArcSealer | None:
    """The sealer for ``[arc]``, or None when ARC is off; ConfigError names what is missing."""
    if not arc.domain:
        return None
    if arc.key_file:
        key: DkimKey | None = load_key(arc.domain, arc.selector, arc.key_file)
    else:
        key = dkim_config.key_for(arc.domain, arc.selector) if dkim_config else None
    if key is None:
        raise ConfigError(f"[arc] no key for {arc.selector}._domainkey.{arc.domain}: add it to "
                          "the [dkim] KeyTable or set [arc] key_file")
    if key.algorithm != "rsa":
        raise ConfigError(f"[arc] {key.path}: ARC needs an RSA key (RFC 8617 allows rsa-sha256 only)")
    return ArcSealer(key, authserv_id)
