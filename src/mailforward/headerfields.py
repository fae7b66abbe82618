"""Reading a message's header section the way RFC 5322 allows, obsolete syntax included.

dkimpy's parser accepts only ``Name:`` with the colon right after the name.
RFC 5322 section 4.5.3 (``obs-optional``) also allows white space before
the colon (``X-Spaces  :   value``), and receivers must accept it: Perl's
Mail::DKIM verifies such mail.  Refusing it made a correctly signed message
fail DKIM and then DMARC, so dkimpy parses :func:`dkimpy_view`, a copy
with that white space removed.

Relaxed header canonicalization (RFC 6376 3.4.2) deletes white space before
the colon anyway, so every relaxed hash over the copy equals the hash over
the original bytes, which are what we send: ARC (relaxed only) verifies and
seals the copy as it is.  Simple header canonicalization hashes a field as
written, so for DKIM :func:`dkimpy_parse` puts the names back as written
into what dkimpy parsed (as :class:`WrittenName`, which dkimpy still finds
by its bare name): ``c=simple`` signatures are verified, and ours made,
over the exact original bytes, as Mail::DKIM checks them.

Lines end at LF (with or without CR), as in dkimpy; a lone CR does not end
a line.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

__all__ = ["WrittenName", "dkimpy_parse", "dkimpy_view", "field_name", "field_values",
           "header_block", "split_header"]

_OBSOLETE_NAME = re.compile(rb"([\x21-\x39\x3b-\x7e]+)[ \t]+:")
"""A field name (printable ASCII but ':') followed by WSP before its colon."""

_EMPTY_LINE = re.compile(rb"(?:\A|(?<=\n))\r?\n")
"""The line that ends the header section: CRLF or LF alone, at a line start."""

_DKIMPY_FIELD = re.compile(rb"[\x21-\x7e]+?:")
"""A line dkimpy's parser takes as a header field (it skips others, such as mbox "From ")."""


def header_block(message: bytes | bytearray) -> bytes:
    """The header section with its line ends, up to (not including) the empty line.

    A slice of the head only: never a copy of a body that can be megabytes.
    """
    boundary = _EMPTY_LINE.search(message)
    return bytes(message if boundary is None else message[:boundary.start()])


def split_header(message: bytes) -> tuple[list[bytes], bytes]:
    """(header fields with their folded lines and line ends, the rest verbatim).

    The rest starts with the empty line that separates the body, if any.
    Only the header section is split into lines: a body can be megabytes.
    """
    block = header_block(message)
    end = len(block)
    fields: list[bytes] = []
    for line in re.findall(rb"[^\n]*\n|[^\n]+\Z", block):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += line
        else:
            fields.append(line)
    return fields, message[end:]


def field_name(field: bytes) -> bytes | None:
    """The lower-cased name of a field, white space before the colon ignored; None without colon."""
    name, sep, _ = field.partition(b":")
    return name.rstrip(b" \t").lower() if sep else None


def field_values(message: bytes, wanted: bytes) -> list[str]:
    """Unfolded values of every header field named ``wanted`` (lower case), as text."""
    values = []
    for field in split_header(message)[0]:
        if field_name(field) == wanted:
            value = field.partition(b":")[2]
            values.append(re.sub(rb"\r?\n", b"", value).decode("utf-8", "replace").strip())
    return values


def dkimpy_view(message: bytes) -> bytes:
    """The message with white space before header colons removed, for dkimpy only.

    Returns ``message`` itself (the same object) when nothing needed changing,
    so callers can tell with ``is`` whether the copy differs.
    """
    fields, rest = split_header(message)
    fixed = [_without_wsp_before_colon(field) for field in fields]
    if fixed == fields:
        return message
    return b"".join(fixed) + rest


def _without_wsp_before_colon(field: bytes) -> bytes:
    match = _OBSOLETE_NAME.match(field)
    return field if match is None else match.group(1) + b":" + field[match.end():]


class WrittenName(bytes):
    """A field name as written, white space before the colon included.

    dkimpy hashes a name as it is (what simple canonicalization needs) and
    finds fields by ``name.lower()``, which here drops that white space, so
    ``h=`` still selects the field.  Relaxed canonicalization strips it too.
    """

    def lower(self) -> bytes:
        return bytes(self).rstrip(b" \t").lower()


def dkimpy_parse(message: bytes, make: Callable[[bytes], Any]) -> Any:
    """``make(dkimpy_view(message))`` -- a ``dkim.DKIM`` -- with header names as written.

    dkimpy raises for what its parser (even on the copy) cannot read.
    """
    view = dkimpy_view(message)
    parsed = make(view)
    if view is not message:
        parsed.headers = _names_as_written(parsed.headers, message)
    return parsed


def _names_as_written(parsed: list[list[bytes]], message: bytes) -> list[list[bytes]]:
    """dkimpy's ``(name, value)`` list for ``dkimpy_view(message)``, with the names of
    obsolete-syntax fields as ``message`` writes them.

    Fields correspond by position: the copy differs from the original only
    inside names, and both split into the same fields.
    """
    originals, _ = split_header(message)
    copies, _ = split_header(dkimpy_view(message))
    kept = [(original, copy) for original, copy in zip(originals, copies, strict=True)
            if _DKIMPY_FIELD.match(copy)]
    if len(kept) != len(parsed):  # not the parse of this message's copy: leave it alone
        return parsed
    return [[WrittenName(original.partition(b":")[0]), value] if original != copy
            else [name, value] for (name, value), (original, copy) in zip(parsed, kept, strict=True)]
