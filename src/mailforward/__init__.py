"""mailforward: a stateless mail-forwarding server.

Accepts mail for hosted domains, looks the alias up, rewrites the envelope
sender with SRS, signs, and relays to the destination, storing no mailboxes.
"""

__version__ = "0.1.0"
