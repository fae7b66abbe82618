"""Message authentication: inbound verdicts (SPF, DKIM, DMARC, ARC) and outbound DKIM/ARC."""
