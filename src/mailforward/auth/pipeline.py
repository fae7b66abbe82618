"""One message's authentication work, in the order the issue fixes.

    verify -> Authentication-Results -> (SRS: the envelope, done by the caller)
           -> DKIM sign -> ARC seal -> deliver

Inbound (:meth:`MessageAuthenticator.inbound`) may refuse the message
(DMARC ``p=reject``, optionally SPF ``-all``) by raising a type the reply
table maps; outbound (:meth:`outbound`) never fails: a message that cannot
be signed or sealed is delivered without, and counted.
"""

from __future__ import annotations

import logging

from ..config import Settings
from ..errors import DmarcRejected, SpfRejected
from .arc import ArcSealer, sealer_from_settings
from .dkim import DkimSigner, load_dkim
from .executors import ON_LOOP_LIMIT, run_cpu
from .signing import SigningInput
from .verify import AuthVerdict, Verifier, strip_forged_results

log = logging.getLogger("mailforward.auth")

Content = bytes | bytearray
"""A message as the SMTP engine hands it over; copied only when there is work to do."""

class MessageAuthenticator:
    def __init__(self, verifier: Verifier | None, signer: DkimSigner | None,
                 sealer: ArcSealer | None, *, authserv_id: str,
                 reject_dmarc_reject: bool = True, reject_spf_fail: bool = False) -> None:
        self.verifier = verifier
        self.signer = signer
        self.sealer = sealer
        self.authserv_id = authserv_id
        self.reject_dmarc_reject = reject_dmarc_reject
        self.reject_spf_fail = reject_spf_fail

    async def inbound(self, content: bytes, client_ip: str, helo: str, mail_from: str,
                      trusted: bool = False) -> bytes:
        """:meth:`verify_inbound` for callers that need only the message."""
        verified, _ = await self.verify_inbound(content, client_ip, helo, mail_from, trusted)
        return bytes(verified)

    async def verify_inbound(self, content: Content, client_ip: str, helo: str, mail_from: str,
                             trusted: bool = False) -> tuple[Content, AuthVerdict | None]:
        """Strip forged results, verify, enforce policy, prepend our Authentication-Results.

        ``trusted`` clients (mynetworks) are verified and labelled but never
        refused by policy: they are our own submitters, like OpenDMARC's IgnoreHosts.
        The verdict (None when verification is off) goes back to the caller
        for the From-header policy.
        """
        if self.verifier is None:
            return content, None
        content = strip_forged_results(bytes(content), self.authserv_id)
        verdict = await self.verifier.verify(content, client_ip, helo, mail_from)
        if not trusted:
            self._enforce(verdict)
        return verdict.header + content, verdict

    def _enforce(self, verdict: AuthVerdict) -> None:
        if self.reject_dmarc_reject and verdict.dmarc_rejects:
            raise DmarcRejected(verdict.from_domain)
        if self.reject_spf_fail and verdict.spf_fails:
            raise SpfRejected(verdict.spf.domain)

    async def outbound(self, content: Content, client_ip: str,
                       verdict: AuthVerdict | None = None) -> Content:
        """DKIM signatures, then the ARC seal over the signed message.

        ``verdict``: our verification of the message, whose Authentication-Results
        the seal carries.  Big messages are signed in the auth CPU pool
        (``executors.CPU``), small ones on the loop (``executors.ON_LOOP_LIMIT``).
        """
        if self.signer is None and self.sealer is None:
            return content
        results = verdict.header.partition(b":")[2] if verdict is not None else None
        if len(content) <= ON_LOOP_LIMIT:
            return self._sign_and_seal(bytes(content), client_ip, results)
        return await run_cpu(self._sign_and_seal, bytes(content), client_ip, results)

    def _sign_and_seal(self, content: bytes, client_ip: str, results: bytes | None) -> bytes:
        """The message parsed once for all its signatures (``signing``); where dkimpy
        cannot parse it, each signer falls back to dkimpy and reports its own failure."""
        parsed = _parsed(content)
        if self.signer is not None:
            fields = self.signer.signature_headers(content, client_ip, parsed)
            if parsed is not None and fields:
                parsed = parsed.with_fields_above(fields)
            content = fields + content
        if self.sealer is not None:
            content = self.sealer.seal(content, parsed, results) + content
        return content


def _parsed(content: bytes) -> SigningInput | None:
    try:
        return SigningInput.parse(content)
    except Exception:  # dkimpy's parse errors: the signers' dkimpy paths log them
        return None


def authenticator_from_settings(settings: Settings) -> MessageAuthenticator:
    """Load keys and tables once, at start-up; a ConfigError names the bad file or key."""
    auth = settings.auth
    authserv_id = auth.authserv_id or settings.server.hostname
    verifier = (Verifier(authserv_id, settings.delivery.nameservers, auth.dns_timeout)
                if auth.verify else None)
    dkim_config = load_dkim(settings.dkim)
    signer = DkimSigner(dkim_config) if dkim_config is not None else None
    sealer = sealer_from_settings(settings.arc, dkim_config, authserv_id)
    return MessageAuthenticator(verifier, signer, sealer, authserv_id=authserv_id,
                                reject_dmarc_reject=auth.reject_dmarc_reject,
                                reject_spf_fail=auth.reject_spf_fail)
