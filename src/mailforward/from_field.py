"""The RFC 5322 From field, read strictly: exactly one field holding exactly one mailbox.

DMARC (RFC 7489 6.6.1) authenticates one domain, the From domain, so a
message whose From a receiver's MUA may read differently from the way we read
it -- two From fields, several mailboxes, an address hidden in a display
name or an encoded-word, a NUL after the domain -- cannot be judged at all.
OpenDMARC refuses such mail (``RejectMultiValueFrom``); so do we, before any
signature of ours could vouch for it.

The parser is a small tokenizer plus the ``mailbox`` grammar (RFC 5322 3.4,
with RFC 6532's UTF-8 and the obsolete ``.`` in phrases), not ``email.utils``:
that one repairs what it cannot parse, and a repaired From is exactly the
disagreement an attacker needs.  Comments nest at most ``MAX_COMMENT_DEPTH``
deep, and the work is linear in the field's length: no recursion a hostile
header can exhaust.

The message handed in is already line-normalised (CRLF only) by the SMTP
engine, so the header section ends at the first empty line for every reader.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from .addresses import normalize_domain
from .errors import AddressError
from .headerfields import field_name, header_block, split_header

MAX_COMMENT_DEPTH = 20

# atext (RFC 5322 3.2.3) plus any non-ASCII character (RFC 6532 3.2).
_ATEXT = re.compile(r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~\u0080-\U0010ffff]+")
_FOLD = re.compile(rb"\r?\n(?=[ \t])")


class FromProblem(enum.Enum):
    MISSING = "missing"
    REPEATED = "repeated"
    NOT_ONE_MAILBOX = "not one mailbox"


@dataclass(frozen=True)
class FromField:
    """The verdict on a message's From: its one mailbox, or what is wrong with it."""

    address: str = ""  # local@domain as written in the header
    domain: str = ""  # normalised (lower case, IDNA)
    problem: FromProblem | None = None


class _Malformed(Exception):
    pass


def read_from_field(message: bytes | bytearray) -> FromField:
    """Find the From field(s) in the header section and parse the one mailbox."""
    values = header_values(message, b"from")
    if not values:
        return FromField(problem=FromProblem.MISSING)
    if len(values) > 1:
        return FromField(problem=FromProblem.REPEATED)
    try:
        local, domain_text = _parse_mailbox(_tokens(values[0].decode("utf-8")))
        domain = normalize_domain(domain_text)
    except (_Malformed, AddressError, UnicodeDecodeError):
        return FromField(problem=FromProblem.NOT_ONE_MAILBOX)
    if "." not in domain:
        return FromField(problem=FromProblem.NOT_ONE_MAILBOX)
    return FromField(address=f"{local}@{domain_text}", domain=domain)


def header_values(message: bytes | bytearray, wanted: bytes) -> list[bytes]:
    """Unfolded raw values of every field named ``wanted`` (lower case) in the header section.

    A name followed by white space before the colon (obsolete syntax, RFC 5322
    4.5.3) is the same field: MUAs read ``From :`` as From.
    """
    fields, _ = split_header(header_block(message))
    return [_FOLD.sub(b"", field.partition(b":")[2]).strip(b" \t\r\n")
            for field in fields if field_name(field) == wanted]


# --- tokens -------------------------------------------------------------------

# Token kinds: "atom" (text), "quoted" (text), or a special character itself.
Token = tuple[str, str]
_SPECIALS = "<>@,;:.[]"


def _tokens(text: str) -> list[Token]:
    """atoms, quoted strings and specials; comments and white space dropped."""
    tokens: list[Token] = []
    position = 0
    while position < len(text):
        char = text[position]
        if char in " \t\r\n":
            position += 1
        elif char == "(":
            position = _skip_comment(text, position)
        elif char == '"':
            position = _quoted(text, position, tokens)
        elif char in _SPECIALS:
            tokens.append((char, char))
            position += 1
        else:
            match = _ATEXT.match(text, position)
            if match is None:  # a control character, backslash or other stray byte
                raise _Malformed(f"unexpected character at {position}")
            tokens.append(("atom", match.group(0)))
            position = match.end()
    return tokens


def _skip_comment(text: str, position: int) -> int:
    depth = 0
    while position < len(text):
        char = text[position]
        if char == "\\":
            position += 1
        elif char == "(":
            depth += 1
            if depth > MAX_COMMENT_DEPTH:
                raise _Malformed("comments nested too deep")
        elif char == ")":
            depth -= 1
            if depth == 0:
                return position + 1
        elif _is_control(char):
            raise _Malformed("control character in a comment")
        position += 1
    raise _Malformed("unclosed comment")


def _quoted(text: str, position: int, tokens: list[Token]) -> int:
    content = []
    position += 1
    while position < len(text):
        char = text[position]
        if char == "\\" and position + 1 < len(text):
            content.append(text[position + 1])
            position += 2
            continue
        if char == '"':
            tokens.append(("quoted", "".join(content)))
            return position + 1
        if _is_control(char):
            raise _Malformed("control character in a quoted string")
        content.append(char)
        position += 1
    raise _Malformed("unclosed quoted string")


def _is_control(char: str) -> bool:
    code = ord(char)
    return (code < 32 and char not in " \t\r\n") or 0x7F <= code <= 0x9F


# --- the mailbox grammar --------------------------------------------------------

def _parse_mailbox(tokens: list[Token]) -> tuple[str, str]:
    """``name-addr`` or ``addr-spec``: (local part, domain as written)."""
    kinds = [kind for kind, _ in tokens]
    if "<" not in kinds:
        return _addr_spec(tokens)
    start = kinds.index("<")
    if kinds.count("<") != 1 or kinds.count(">") != 1 or kinds[-1] != ">":
        raise _Malformed("not one angle-addr at the end")
    if any(kind not in ("atom", "quoted", ".") for kind in kinds[:start]):
        raise _Malformed("display name holds more than words")
    return _addr_spec(tokens[start + 1:-1])


def _addr_spec(tokens: list[Token]) -> tuple[str, str]:
    kinds = [kind for kind, _ in tokens]
    if kinds.count("@") != 1:
        raise _Malformed("not one @")
    at = kinds.index("@")
    local = _dotted(tokens[:at], allow_quoted=True)
    domain = _dotted(tokens[at + 1:], allow_quoted=False)
    return local, domain


def _dotted(tokens: list[Token], allow_quoted: bool) -> str:
    """word *("." word): a dot-atom or (local part only) quoted strings between dots."""
    words = tokens[0::2]
    dots = tokens[1::2]
    allowed = ("atom", "quoted") if allow_quoted else ("atom",)
    if not words or any(kind not in allowed for kind, _ in words):
        raise _Malformed("empty or malformed word")
    if any(kind != "." for kind, _ in dots) or len(tokens) % 2 == 0:
        raise _Malformed("misplaced dot")
    return ".".join(text for _, text in words)
