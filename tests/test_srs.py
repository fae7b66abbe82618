"""SRS rewriting (mailforward.srs) and its tcp_table server, against PostSRSd's vectors.

The vectors are PostSRSd's own test suite (secret ``tops3cr3t``, domain
``example.com``, time 1577836860 = stamp ``2W``).  Interop with a running
PostSRSd lives in test_srs_postsrsd.py.
"""

from __future__ import annotations

import asyncio
import logging
import os
import stat
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailforward.errors import MailforwardError
from mailforward.srs import (
    SrsConfigError,
    SrsError,
    SrsExpired,
    SrsHashError,
    SrsInvalid,
    SrsNotRewritten,
    SrsNotSrsAddress,
    SrsRewriter,
    SrsSecretError,
    SrsSyntaxError,
    generate_secret_file,
    is_srs_address,
    load_secrets,
)
from mailforward.srs_tcp import parse_request, start_srs_tcp_servers, url_encode

from smtp_harness import Clock  # settable: one test mints an address and ages it

T0 = 1577836860  # PostSRSd's test time: day 18262, stamp "2W"
DAY = 86400
SECRET = "tops3cr3t"


def make(clock: Clock | None = None, **kwargs: Any) -> SrsRewriter:
    kwargs.setdefault("secrets", [SECRET])
    return SrsRewriter("example.com", clock=clock or Clock(T0), **kwargs)


@pytest.fixture
def srs() -> SrsRewriter:
    return make()


# -- PostSRSd's test vectors ----------------------------------------------------

FORWARD_VECTORS = [
    ("test@otherdomain.com", "SRS0=vmyz=2W=otherdomain.com=test@example.com"),
    ("SRS0=opaque+string@otherdomain.com", "SRS1=chaI=otherdomain.com==opaque+string@example.com"),
    ("SRS1=X=thirddomain.com==opaque+string@otherdomain.com",
     "SRS1=JIBX=thirddomain.com==opaque+string@example.com"),
    ("hash234@somedomain.com", "SRS0=+3/5=2W=somedomain.com=hash234@example.com"),
]


@pytest.mark.parametrize(("sender", "expected"), FORWARD_VECTORS)
def test_forward_matches_postsrsd_vectors(srs: SrsRewriter, sender: str, expected: str) -> None:
    assert srs.forward(sender) == expected


def test_sender_in_own_domain_is_returned_unchanged(srs: SrsRewriter) -> None:
    assert srs.forward("test@example.com") == "test@example.com"
    assert srs.forward("Test@EXAMPLE.com") == "Test@EXAMPLE.com"


def test_sender_in_subdomain_of_own_domain_is_rewritten(srs: SrsRewriter) -> None:
    assert srs.forward("test@sub.example.com").startswith("SRS0=")


def test_already_rewritten_sender_is_not_rewritten_again(srs: SrsRewriter) -> None:
    with pytest.raises(SrsNotRewritten) as info:
        srs.forward("SRS0=XjO9=2V=otherdomain.com=test@example.com")
    assert info.value.reason == "Already rewritten"


def test_sender_without_at_sign_is_an_error(srs: SrsRewriter) -> None:
    with pytest.raises(SrsSyntaxError) as info:
        srs.forward("bla")
    assert info.value.reason == "No at sign in sender address"


def test_null_sender_stays_null(srs: SrsRewriter) -> None:
    assert srs.forward("") == ""


REVERSE_VECTORS = [
    ("SRS0=XjO9=2V=otherdomain.com=test@example.com", "test@otherdomain.com"),
    ("srs0=xjo9=2v=otherdomain.com=test@example.com", "test@otherdomain.com"),
    ("SRS0=XJO9=2V=OTHERDOMAIN.COM=TEST@EXAMPLE.COM", "TEST@OTHERDOMAIN.COM"),
    ("SRS1=JIBX=thirddomain.com==opaque+string@example.com", "SRS0=opaque+string@thirddomain.com"),
    ("SRS0=+3/5=2W=somedomain.com=hash234@example.com", "hash234@somedomain.com"),
]


@pytest.mark.parametrize(("address", "expected"), REVERSE_VECTORS)
def test_reverse_matches_postsrsd_vectors(srs: SrsRewriter, address: str, expected: str) -> None:
    assert srs.reverse(address) == expected


REVERSE_FAILURES = [
    ("SRS0=te87=T7=otherdomain.com=test@example.com", SrsExpired, "Time stamp out of date."),
    ("SRS0=VcIb=7N=otherdomain.com=test@example.com", SrsExpired, "Time stamp out of date."),
    ("SRS0=FAKE=2V=otherdomain.com=test@example.com", SrsHashError, "Hash invalid in SRS address."),
    ("SRS0=@example.com", SrsSyntaxError, "No hash in SRS0 address."),
    ("SRS0=XjO9@example.com", SrsSyntaxError, "No timestamp in SRS0 address."),
    ("SRS0=XjO9=2V@example.com", SrsSyntaxError, "No host in SRS0 address."),
    ("SRS0=XjO9=2V=otherdomain.com@example.com", SrsSyntaxError, "No user in SRS0 address."),
    ("test@example.com", SrsNotSrsAddress, "Not an SRS address."),
]


@pytest.mark.parametrize(("address", "error", "reason"), REVERSE_FAILURES)
def test_reverse_refuses_bad_addresses_with_postsrsd_reason(
        srs: SrsRewriter, address: str, error: type[SrsError], reason: str) -> None:
    with pytest.raises(error) as info:
        srs.reverse(address)
    assert info.value.reason == reason
    assert isinstance(info.value, SrsInvalid)


@pytest.mark.parametrize(("address", "reason"), [
    ("SRS1=@example.com", "No hash in SRS1 address."),
    ("SRS1=abc@example.com", "No host in SRS1 address."),
    ("SRS1=abc=host@example.com", "No user in SRS1 address."),
    ("SRS0=abcd=!!=host=user@example.com", "Bad base32 character in timestamp."),
    ("SRS0=abcd=2WW=host=user@example.com", "Time stamp out of date."),
    ("SRS0", "No hash in SRS0 address."),
    ("SRS2=abcd=2W=host=user@example.com", "Not an SRS address."),
    ("SRS0xabcd=2W=host=user@example.com", "Not an SRS address."),
])
def test_malformed_srs_addresses_get_postsrsd_reasons(
        srs: SrsRewriter, address: str, reason: str) -> None:
    with pytest.raises(SrsInvalid) as info:
        srs.reverse(address)
    assert info.value.reason == reason


# -- round trips, separators, SRS1 ----------------------------------------------

def test_forward_then_reverse_gives_the_original_sender(srs: SrsRewriter) -> None:
    for sender in ["test@otherdomain.com", "Mixed.Case+tag@Other.Example", "a=b=c@x.test"]:
        assert srs.reverse(srs.forward(sender)) == sender


@pytest.mark.parametrize("separator", ["+", "-"])
def test_configured_separator_follows_the_tag(separator: str) -> None:
    srs = make(separator=separator)
    assert srs.forward("test@otherdomain.com") == f"SRS0{separator}vmyz=2W=otherdomain.com=test@example.com"
    assert srs.forward("SRS0=opaque+string@otherdomain.com") == \
        f"SRS1{separator}chaI=otherdomain.com==opaque+string@example.com"
    assert srs.reverse(f"SRS0{separator}vmyz=2W=otherdomain.com=test@example.com") == "test@otherdomain.com"


@pytest.mark.parametrize("separator", ["=", "+", "-"])
def test_reverse_accepts_every_separator_whatever_is_configured(separator: str) -> None:
    for configured in "=+-":
        srs = make(separator=configured)
        assert srs.reverse(f"SRS0{separator}vmyz=2W=otherdomain.com=test@example.com") == \
            "test@otherdomain.com"
        assert srs.reverse(f"srs1{separator}JIBX=thirddomain.com==opaque+string@example.com") == \
            "SRS0=opaque+string@thirddomain.com"


def test_srs0_of_another_forwarder_becomes_srs1_that_reverses_to_it(srs: SrsRewriter) -> None:
    theirs = "SRS0=abcd=2W=orig.test=bob@forwarder1.test"
    ours = srs.forward(theirs)
    assert ours.startswith("SRS1=") and ours.endswith("=forwarder1.test==abcd=2W=orig.test=bob@example.com")
    assert srs.reverse(ours) == theirs


def test_srs0_sender_keeps_its_own_separator_inside_srs1(srs: SrsRewriter) -> None:
    ours = srs.forward("srs0+opaque@forwarder1.test")
    assert ours.split("=", 2)[2] == "forwarder1.test=+opaque@example.com"
    assert srs.reverse(ours) == "SRS0+opaque@forwarder1.test"


def test_srs1_sender_keeps_the_first_hop_and_is_resigned(srs: SrsRewriter) -> None:
    ours = srs.forward("SRS1=ZZZZ=first.test==abcd=2W=orig.test=bob@second.test")
    assert ours.startswith("SRS1=") and ours.endswith("=first.test==abcd=2W=orig.test=bob@example.com")
    assert srs.reverse(ours) == "SRS0=abcd=2W=orig.test=bob@first.test"


@pytest.mark.parametrize(("sender", "reason"), [
    ("SRS1=@x.test", "No hash in SRS1 address."),
    ("SRS1=abc@x.test", "No host in SRS1 address."),
    ("SRS1=abc=def@x.test", "No user in SRS1 address."),
])
def test_forwarding_a_broken_srs1_sender_fails_like_postsrsd(
        srs: SrsRewriter, sender: str, reason: str) -> None:
    with pytest.raises(SrsSyntaxError) as info:
        srs.forward(sender)
    assert info.value.reason == reason


def test_forward_splits_the_sender_at_the_first_at_sign(srs: SrsRewriter) -> None:
    result = srs.forward("a@b@example.com")  # host "b@example.com" is not ours
    assert result.startswith("SRS0=") and result.endswith("=2W=b@example.com=a@example.com")


def test_reverse_splits_at_the_first_at_sign_and_ignores_the_domain(srs: SrsRewriter) -> None:
    assert srs.reverse("SRS0=XjO9=2V=otherdomain.com=test@anything@else") == "test@otherdomain.com"
    assert srs.reverse("SRS0=XjO9=2V=otherdomain.com=test@not-our-domain.test") == "test@otherdomain.com"


def test_original_local_part_may_contain_separators(srs: SrsRewriter) -> None:
    sender = "x=y=z@otherdomain.com"
    rewritten = srs.forward(sender)
    assert rewritten.endswith("=otherdomain.com=x=y=z@example.com")
    assert srs.reverse(rewritten) == sender


# -- hash: case, length, rotation ------------------------------------------------

def test_tampered_hash_is_refused(srs: SrsRewriter) -> None:
    with pytest.raises(SrsHashError, match="Hash invalid"):
        srs.reverse("SRS0=vmyA=2W=otherdomain.com=test@example.com")


def test_tampered_original_address_is_refused(srs: SrsRewriter) -> None:
    with pytest.raises(SrsHashError, match="Hash invalid"):
        srs.reverse("SRS0=vmyz=2W=otherdomain.com=eve@example.com")


def test_hash_and_fields_compare_case_insensitively(srs: SrsRewriter) -> None:
    assert srs.reverse("SRS0=VMYZ=2w=OtherDomain.com=Test@example.com") == "Test@OtherDomain.com"


def test_hash_is_over_lowercased_fields_so_case_does_not_change_it(srs: SrsRewriter) -> None:
    upper = srs.forward("TEST@OTHERDOMAIN.COM")
    assert upper == "SRS0=vmyz=2W=OTHERDOMAIN.COM=TEST@example.com"


def test_only_ascii_is_lowercased_before_hashing(srs: SrsRewriter) -> None:
    # C's tolower() in the C locale leaves UTF-8 bytes alone, so É and é differ.
    assert srs.forward("É@x.test").split("=")[1] != srs.forward("é@x.test").split("=")[1]


def test_three_char_hash_is_refused_when_hash_min_is_4() -> None:
    with pytest.raises(SrsHashError) as info:
        make(hash_min=4).reverse("SRS0=vmy=2W=otherdomain.com=test@example.com")
    assert info.value.reason == "Hash too short in SRS address."


def test_three_char_hash_is_accepted_when_hash_min_is_3() -> None:
    assert make(hash_min=3).reverse("SRS0=vmy=2W=otherdomain.com=test@example.com") == "test@otherdomain.com"


def test_wrong_three_char_hash_is_still_refused_when_hash_min_is_3() -> None:
    with pytest.raises(SrsHashError, match="Hash invalid"):
        make(hash_min=3).reverse("SRS0=vmA=2W=otherdomain.com=test@example.com")


def test_longer_hash_is_compared_on_hash_length_characters(srs: SrsRewriter) -> None:
    assert srs.reverse("SRS0=vmyzXYZ=2W=otherdomain.com=test@example.com") == "test@otherdomain.com"


def test_old_four_char_hashes_verify_after_raising_hash_length() -> None:
    old = make().forward("test@otherdomain.com")
    new = make(hash_length=6, hash_min=4)
    assert new.forward("test@otherdomain.com").startswith("SRS0=vmyz")  # same digest, longer
    assert new.reverse(old) == "test@otherdomain.com"


def test_address_signed_with_old_secret_reverses_after_key_rotation() -> None:
    old = make(secrets=["old-secret"])
    rotated = make(secrets=["new-secret", "old-secret"])
    address = old.forward("test@otherdomain.com")
    assert rotated.reverse(address) == "test@otherdomain.com"


def test_first_secret_signs_after_key_rotation() -> None:
    rotated = make(secrets=["new-secret", "old-secret"])
    address = rotated.forward("test@otherdomain.com")
    assert address == make(secrets=["new-secret"]).forward("test@otherdomain.com")
    with pytest.raises(SrsHashError):
        make(secrets=["old-secret"]).reverse(address)


def test_address_signed_with_a_dropped_secret_is_refused() -> None:
    address = make(secrets=["retired"]).forward("test@otherdomain.com")
    with pytest.raises(SrsHashError):
        make(secrets=["new-secret", "old-secret"]).reverse(address)


def test_secret_is_used_as_text_not_decoded_hex() -> None:
    # PostSRSd keys HMAC with the line as written; decoding hex would change every hash.
    text = make(secrets=["4142"]).forward("test@otherdomain.com")
    assert text != make(secrets=["AB"]).forward("test@otherdomain.com")


# -- the day stamp ------------------------------------------------------------------

def _aged(days: float) -> tuple[str, SrsRewriter]:
    """An address minted at T0 and a rewriter whose clock is ``days`` later."""
    clock = Clock(T0)
    srs = make(clock)
    address = srs.forward("test@otherdomain.com")
    clock.now = T0 + days * DAY
    return address, srs


def test_address_is_valid_on_day_21() -> None:
    address, srs = _aged(21)
    assert srs.reverse(address) == "test@otherdomain.com"


def test_address_is_expired_on_day_22() -> None:
    address, srs = _aged(22)
    with pytest.raises(SrsExpired) as info:
        srs.reverse(address)
    assert info.value.reason == "Time stamp out of date."


def test_expiry_boundary_is_the_utc_day_not_the_hour() -> None:
    day = T0 // DAY
    clock = Clock(day * DAY)  # minted at 00:00:00 UTC
    srs = make(clock)
    address = srs.forward("test@otherdomain.com")
    clock.now = (day + 22) * DAY - 1  # last second of day +21
    assert srs.reverse(address) == "test@otherdomain.com"
    clock.now = (day + 22) * DAY  # first second of day +22
    with pytest.raises(SrsExpired):
        srs.reverse(address)


def test_max_age_days_is_configurable() -> None:
    clock = Clock(T0)
    srs = make(clock, max_age_days=2)
    address = srs.forward("test@otherdomain.com")
    clock.now = T0 + 2 * DAY
    assert srs.reverse(address) == "test@otherdomain.com"
    clock.now = T0 + 3 * DAY
    with pytest.raises(SrsExpired):
        srs.reverse(address)


def test_stamp_from_the_future_is_refused() -> None:
    address, srs = _aged(-1)
    with pytest.raises(SrsExpired):
        srs.reverse(address)


def test_stamp_wraps_every_1024_days() -> None:
    # Two base32 characters hold days mod 1024: an address 1024 days old looks new.
    address, srs = _aged(1024)
    assert srs.reverse(address) == "test@otherdomain.com"
    address, srs = _aged(1024 + 22)
    with pytest.raises(SrsExpired):
        srs.reverse(address)


def test_age_is_counted_across_the_1024_day_wrap() -> None:
    day = T0 // DAY
    start = (day - day % 1024 + 1020) * DAY  # a day whose stamp is 1020 ("74")
    clock = Clock(start)
    srs = make(clock)
    address = srs.forward("test@otherdomain.com")
    assert address.split("=")[2] == "74"
    clock.now = start + 7 * DAY  # stamp 3 ("AD") after the wrap
    assert srs.reverse(address) == "test@otherdomain.com"
    clock.now = start + 22 * DAY
    with pytest.raises(SrsExpired):
        srs.reverse(address)


def test_stamp_is_case_insensitive(srs: SrsRewriter) -> None:
    assert srs.reverse("SRS0=vmyz=2w=otherdomain.com=test@example.com") == "test@otherdomain.com"


# -- exclusions --------------------------------------------------------------------

@pytest.fixture
def excluding() -> SrsRewriter:
    return make(exclude_domains=["excluded.com", ".exclude-subdomains.com"])


@pytest.mark.parametrize("sender", ["test@excluded.com", "test@EXCLUDED.com",
                                    "test@subdomain.of.exclude-subdomains.com"])
def test_excluded_domains_are_not_rewritten(excluding: SrsRewriter, sender: str) -> None:
    with pytest.raises(SrsNotRewritten) as info:
        excluding.forward(sender)
    assert info.value.reason == "Domain excluded py policy"


@pytest.mark.parametrize("sender", ["test@subdomain.of.excluded.com", "test@exclude-subdomains.com",
                                    "test@notexcluded.com"])
def test_exclusion_without_dot_is_exact_and_with_dot_is_subdomains_only(
        excluding: SrsRewriter, sender: str) -> None:
    assert excluding.forward(sender).startswith("SRS0=")


def test_exclusion_is_checked_before_already_rewritten() -> None:
    srs = make(exclude_domains=["example.com"])
    with pytest.raises(SrsNotRewritten, match="excluded"):
        srs.forward("SRS0=XjO9=2V=otherdomain.com=test@example.com")


# -- limits and robustness -------------------------------------------------------------

def test_result_of_1024_bytes_or_more_is_refused_like_postsrsd(srs: SrsRewriter) -> None:
    fits = "a" * (1023 - len("SRS0=vmyz=2W=x.test=@example.com")) + "@x.test"
    assert len(srs.forward(fits)) == 1023
    with pytest.raises(SrsSyntaxError) as info:
        srs.forward("a" + fits)
    assert info.value.reason == "Buffer too small."


def test_srs_errors_are_mailforward_errors() -> None:
    assert issubclass(SrsError, MailforwardError)
    assert issubclass(SrsSecretError, SrsConfigError)


@pytest.mark.parametrize("kwargs", [
    {"separator": "*"}, {"hash_length": 0}, {"hash_length": 28}, {"hash_min": 0},
    {"hash_min": 5}, {"max_age_days": -1}, {"secrets": []}, {"secrets": [""]},
    {"secrets": ["a\nb"]}, {"exclude_domains": [""]},
])
def test_invalid_configuration_is_refused(kwargs: dict[str, Any]) -> None:
    with pytest.raises(SrsConfigError):
        make(**kwargs)


@pytest.mark.parametrize("domain", ["", "a@b", "exa mple.com"])
def test_invalid_srs_domain_is_refused(domain: str) -> None:
    with pytest.raises(SrsConfigError):
        SrsRewriter(domain, [SECRET])


def test_rewriter_is_immutable_and_hides_its_secrets(srs: SrsRewriter) -> None:
    with pytest.raises(AttributeError):
        srs.domain = "evil.test"
    assert SECRET not in repr(srs)


@pytest.mark.parametrize(("local_part", "expected"), [
    ("SRS0=x", True), ("srs1+x", True), ("Srs0-x", True), ("SRS0", False), ("SRS2=x", False),
    ("SRS0x", False), ("user", False), ("", False),
])
def test_is_srs_address_recognises_tag_and_separator(local_part: str, expected: bool) -> None:
    assert is_srs_address(local_part) is expected


SRSISH = st.lists(
    st.sampled_from(["SRS0", "SRS1", "srs0", "=", "=", "+", "-", "@", "2W", "vmyz", "example.com",
                     "x.test", "%", "\x00", "é"]) | st.text(max_size=4),
    max_size=10,
).map("".join)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text() | SRSISH)
def test_forward_and_reverse_raise_only_srs_errors_on_arbitrary_text(text: str) -> None:
    srs = make(exclude_domains=["excluded.test", ".subs.test"])
    for operation in (srs.forward, srs.reverse):
        try:
            result = operation(text)
        except SrsError as e:
            assert isinstance(e.reason, str) and e.reason
        else:
            assert isinstance(result, str)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=80))
def test_wire_forward_and_reverse_raise_only_srs_errors_on_arbitrary_bytes(data: bytes) -> None:
    srs = make()
    for operation in (srs.forward_bytes, srs.reverse_bytes):
        try:
            assert isinstance(operation(data), bytes)
        except SrsError:
            pass


LOCAL = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="@\x00"),
                max_size=30).filter(lambda s: not is_srs_address(s) and s[:4].upper() not in ("SRS0", "SRS1"))
# A host with '=' or '@' cannot survive the SRS0 format (PostSRSd neither).
HOST = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="@=\x00"),
               max_size=30).filter(lambda h: h.lower() != "example.com")


@settings(max_examples=200, deadline=None)
@given(LOCAL, HOST)
def test_reverse_undoes_forward_for_any_plain_sender(local: str, host: str) -> None:
    srs = make()
    sender = f"{local}@{host}"
    assert srs.reverse(srs.forward(sender)) == sender


# -- the secrets file -------------------------------------------------------------------

def _secret_file(tmp_path: Path, content: bytes, mode: int = 0o600) -> Path:
    path = tmp_path / "srs.secret"
    path.write_bytes(content)
    path.chmod(mode)
    return path


def test_secrets_are_read_one_per_line_first_first(tmp_path: Path) -> None:
    path = _secret_file(tmp_path, b"new-secret\r\n\nold secret \n\n")
    assert load_secrets(path) == ["new-secret", "old secret "]


def test_missing_secret_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(SrsSecretError, match=r"srs\.secret does not exist"):
        load_secrets(tmp_path / "srs.secret")


@pytest.mark.parametrize("content", [b"", b"\n\n\r\n"])
def test_empty_secret_file_is_named(tmp_path: Path, content: bytes) -> None:
    path = _secret_file(tmp_path, content)
    with pytest.raises(SrsSecretError, match=r"srs\.secret is empty"):
        load_secrets(path)


@pytest.mark.parametrize(("mode", "complaint"), [
    (0o640, "readable by group"), (0o620, "writable by group"), (0o610, "executable by group"),
    (0o604, "readable by others"), (0o602, "writable by others"), (0o601, "executable by others"),
])
def test_secret_file_open_to_group_or_others_is_refused_and_says_how(
        tmp_path: Path, mode: int, complaint: str) -> None:
    path = _secret_file(tmp_path, b"secret\n", mode)
    with pytest.raises(SrsSecretError) as info:
        load_secrets(path)
    assert str(path) in str(info.value) and complaint in str(info.value)
    assert f"{mode:04o}" in str(info.value)


def test_secret_file_readable_by_all_names_every_permission(tmp_path: Path) -> None:
    path = _secret_file(tmp_path, b"secret\n", 0o666)
    with pytest.raises(SrsSecretError, match="readable by group, writable by group, "
                                             "readable by others, writable by others"):
        load_secrets(path)


def test_secret_file_that_is_a_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SrsSecretError, match="not a regular file"):
        load_secrets(tmp_path)


def test_generated_secret_file_is_private_hex_and_loadable(tmp_path: Path) -> None:
    path = tmp_path / "srs.secret"
    generate_secret_file(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    (secret,) = load_secrets(path)
    assert len(secret) == 64 and int(secret, 16) >= 0


def test_generated_secrets_differ(tmp_path: Path) -> None:
    generate_secret_file(tmp_path / "a")
    generate_secret_file(tmp_path / "b")
    assert load_secrets(tmp_path / "a") != load_secrets(tmp_path / "b")


def test_generate_secret_file_refuses_to_overwrite(tmp_path: Path) -> None:
    path = _secret_file(tmp_path, b"keep me\n")
    with pytest.raises(SrsSecretError, match="refusing to overwrite"):
        generate_secret_file(path)
    assert path.read_bytes() == b"keep me\n"


# -- the tcp_table server --------------------------------------------------------------

@pytest.mark.parametrize(("line", "key"), [
    (b"get a@b\n", b"a@b"), (b"get a%20b@c\r\n", b"a b@c"), (b"  get a@b\n", b"a@b"),
    (b"get  a@b\n", b" a@b"), (b"get\ra@b\n", b"a@b"), (b"get a@b", b"a@b"),
    (b"get a%00b\n", b"a"), (b"get a@b\x00junk\n", b"a@b"),
    (b"get \n", None), (b"get\n", None), (b"GET a@b\n", None), (b"put a@b\n", None),
    (b"get\ta@b\n", None), (b"get a%4\n", None), (b"get a%zz\n", None), (b"\n", None),
    (b"get " + b"a" * 1019, None),
])
def test_requests_are_parsed_like_postsrsd(line: bytes, key: bytes | None) -> None:
    assert parse_request(line) == key


def test_replies_escape_percent_space_and_non_ascii_in_lower_case_hex() -> None:
    assert url_encode(b"a b%c\x01\x7f\xc3\xa9=+/@") == b"a%20b%25c%01%7f%c3%a9=+/@"


async def _exchange(port: int, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    writer.write_eof()
    reply = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    await writer.wait_closed()
    return reply


@pytest.fixture
async def tcp_ports() -> AsyncIterator[tuple[int, int]]:
    srs = make(exclude_domains=["excluded.com"])
    servers = await start_srs_tcp_servers(srs, "127.0.0.1", 0, 0)
    yield servers[0].sockets[0].getsockname()[1], servers[1].sockets[0].getsockname()[1]
    for server in servers:
        server.close()
        await server.wait_closed()


async def test_tcp_forward_answers_200_with_the_rewritten_sender(tcp_ports: tuple[int, int]) -> None:
    reply = await _exchange(tcp_ports[0], b"get test@otherdomain.com\n")
    assert reply == b"200 SRS0=vmyz=2W=otherdomain.com=test@example.com\n"


async def test_tcp_reverse_answers_200_with_the_original_sender(tcp_ports: tuple[int, int]) -> None:
    reply = await _exchange(tcp_ports[1], b"get SRS0=XjO9=2V=otherdomain.com=test@example.com\n")
    assert reply == b"200 test@otherdomain.com\n"


async def test_tcp_answers_not_rewritten_and_errors_with_500_and_postsrsd_text(
        tcp_ports: tuple[int, int]) -> None:
    forward = await _exchange(tcp_ports[0], b"get test@excluded.com\nget bla\n"
                                            b"get SRS0=vmyz=2W=otherdomain.com=test@example.com\n"
                                            b"get test@example.com\n")
    assert forward == (b"500 Domain excluded py policy\n500 No at sign in sender address\n"
                       b"500 Already rewritten\n200 test@example.com\n")
    reverse = await _exchange(tcp_ports[1], b"get test@example.com\nget SRS0=@x\n")
    assert reverse == b"500 Not an SRS address.\n500 No hash in SRS0 address.\n"


async def test_tcp_decodes_the_key_and_encodes_the_reply(tcp_ports: tuple[int, int]) -> None:
    reply = await _exchange(tcp_ports[0], b"get a%20b@x.test\n")
    assert reply.startswith(b"200 SRS0=") and reply.endswith(b"=x.test=a%20b@example.com\n")


async def test_tcp_invalid_request_gets_500_and_the_connection_is_closed(
        tcp_ports: tuple[int, int]) -> None:
    reply = await _exchange(tcp_ports[0], b"get a@b.test\nput x\nget c@d.test\n")
    lines = reply.splitlines()
    assert len(lines) == 2 and lines[0].startswith(b"200 ") and lines[1] == b"500 Invalid request"


async def test_tcp_line_of_1023_bytes_or_more_is_an_invalid_request(tcp_ports: tuple[int, int]) -> None:
    assert await _exchange(tcp_ports[0], b"get " + b"a" * 1100 + b"@x\n") == b"500 Invalid request\n"


async def test_tcp_empty_key_after_decoding_is_a_missing_at_sign(tcp_ports: tuple[int, int]) -> None:
    assert await _exchange(tcp_ports[0], b"get %00\n") == b"500 No at sign in sender address\n"


async def test_tcp_lookups_are_logged_as_postsrsd_logs_them(
        tcp_ports: tuple[int, int], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="mailforward.srs_tcp")
    await _exchange(tcp_ports[0], b"get test@otherdomain.com\nget test@excluded.com\n")
    assert ("srs_forward: <test@otherdomain.com> rewritten as "
            "<SRS0=vmyz=2W=otherdomain.com=test@example.com>") in caplog.text
    assert "srs_forward: <test@excluded.com> not rewritten: Domain excluded py policy" in caplog.text


async def test_srs_servers_log_where_they_listen(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="mailforward.srs_tcp")
    servers = await start_srs_tcp_servers(make(), "127.0.0.1", 0, 0)
    for server in servers:
        server.close()
        await server.wait_closed()
    assert "listening for forward lookups on 127.0.0.1:" in caplog.text
    assert "listening for reverse lookups on 127.0.0.1:" in caplog.text
