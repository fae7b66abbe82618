"""DKIM signing from OpenDKIM's tables: parsing, trust, and signatures two verifiers accept.

Keys are made with ``generate_key`` (1024-bit RSA for speed), published in a
zone served by the loopback DNS server, and signatures are checked by dkimpy
and, independently, by Perl's Mail::DKIM (``mail_dkim.py``).
"""

from __future__ import annotations

import logging
import os
import re
import stat
from collections.abc import Callable
from pathlib import Path

import dkim
import dns.resolver
import pytest
from cryptography.hazmat.primitives import serialization

from mailforward.auth.dkim import (
    DkimConfig,
    DkimError,
    DkimKey,
    DkimSigner,
    check_key_file,
    generate_key,
    load_dkim,
)
from mailforward.auth.rsa_openssl import PreparedRsaPem
from mailforward.config import DkimSettings
from mailforward.errors import ConfigError

from dns_server import LoopbackDNSServer
from mail_dkim import mail_dkim_verify, mail_dkim_verify_arc

SEED_KEY_NAME = "selector1._domainkey.example.org"

MESSAGE = (b"From: Alice <alice@example.org>\r\n"
           b"To: bob@forward.test\r\n"
           b"Subject: DKIM test\r\n"
           b"Date: Mon, 01 Jan 2024 00:00:00 +0000\r\n"
           b"Message-ID: <dkim-test@example.org>\r\n"
           b"Received: from somewhere by here\r\n"
           b"\r\n"
           b"Hello.\r\n")


# ------------------------------------------------------------------ fixtures


class Keys:
    """Keys made once for the module: RSA for two domains, Ed25519, and a forwarder's."""

    def __init__(self, directory: Path) -> None:
        for name in ("example.org", "example.net", "forward.test"):
            (directory / name).mkdir()
        self.org = generate_key("example.org", "selector1", directory / "example.org", bits=1024)
        self.org2 = generate_key("example.org", "selector2", directory / "example.org", bits=1024)
        self.net = generate_key("example.net", "sel", directory / "example.net", bits=1024)
        self.ed = generate_key("example.org", "ed", directory / "example.org",
                               key_type="ed25519")
        self.fwd = generate_key("forward.test", "fwd", directory / "forward.test", bits=1024)

    def all(self) -> list[DkimKey]:
        return [self.org, self.org2, self.net, self.ed, self.fwd]

    def key_table(self) -> list[str]:
        return [f"{key.name} {key.domain}:{key.selector}:{key.path}" for key in self.all()]


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    return Keys(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="module")
def dns_zone(keys: Keys) -> str:
    """The keys' records, served on loopback by the ``loopback_dns`` fixture."""
    return "\n".join(key.zone_lines() for key in keys.all()) + "\n"


@pytest.fixture(scope="module")
def dnsfunc(loopback_dns: LoopbackDNSServer) -> Callable[..., bytes | None]:
    """dkimpy's DNS hook, asking the loopback server only."""
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = ["127.0.0.1"]
    resolver.port = loopback_dns.port

    def lookup(name: bytes | str, timeout: float = 5) -> bytes | None:
        text = name.decode() if isinstance(name, bytes) else name
        try:
            answer = resolver.resolve(text, "TXT", lifetime=timeout)
        except dns.resolver.NXDOMAIN:
            return None
        return b"".join(answer[0].strings)

    return lookup


def write(path: Path, *lines: str) -> str:
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


def seed_settings(tmp_path: Path, keys: Keys, signing: tuple[str, ...] = (),
                  **extra: str) -> DkimSettings:
    """The seed's three files in tmp_path, with our keys; extra SigningTable lines appended."""
    key_table = write(tmp_path / "KeyTable", *keys.key_table())
    signing_table = write(tmp_path / "SigningTable",
                          *(signing or (f"*@example.org {SEED_KEY_NAME}",)))
    trusted = write(tmp_path / "TrustedHosts", "127.0.0.1", "localhost", "::1")
    return DkimSettings(key_table=key_table, signing_table="refile:" + signing_table,
                        trusted_hosts=trusted, **extra)


def load(settings: DkimSettings) -> DkimConfig:
    config = load_dkim(settings)
    assert config is not None
    return config


def inline(keys: Keys, *signing: str, trusted: tuple[str, ...] = (),
           **extra: str) -> DkimConfig:
    return load(DkimSettings(keys=tuple(keys.key_table()), signing=signing, trusted=trusted,
                             **extra))


def signature_tags(header: bytes) -> dict[str, str]:
    text = re.sub(r"\s+", "", header.decode().split(":", 1)[1])
    return dict(tag.split("=", 1) for tag in text.split(";") if tag)


# ------------------------------------------------------------------ parsing


def test_seed_key_table_line_loads_domain_selector_and_path(tmp_path: Path, keys: Keys) -> None:
    config = load(seed_settings(tmp_path, keys))
    key = config.keys[SEED_KEY_NAME]
    assert (key.domain, key.selector, key.path) == ("example.org", "selector1", keys.org.path)


def test_seed_refile_signing_table_signs_any_address_of_the_domain(tmp_path: Path,
                                                                     keys: Keys) -> None:
    config = load(seed_settings(tmp_path, keys))
    assert config.signers_for("anyone@example.org") == [keys.org]


def test_wildcard_domain_pattern_does_not_match_other_domains(tmp_path: Path,
                                                              keys: Keys) -> None:
    config = load(seed_settings(tmp_path, keys))
    assert config.signers_for("alice@example.com") == []
    assert config.signers_for("alice@mail.example.org") == []


def test_wildcard_subdomain_pattern_matches_only_subdomains(keys: Keys) -> None:
    config = inline(keys, f"*@*.example.org {SEED_KEY_NAME}")
    assert config.signers_for("alice@mail.example.org") == [keys.org]
    assert config.signers_for("alice@example.org") == []


def test_pattern_matching_ignores_case(keys: Keys) -> None:
    config = inline(keys, f"*@Example.ORG {SEED_KEY_NAME}")
    assert config.signers_for("Alice@EXAMPLE.org") == [keys.org]


def test_first_matching_line_wins(keys: Keys) -> None:
    config = inline(keys, f"alice@example.org {keys.org2.name}", f"*@example.org {keys.org.name}")
    assert config.signers_for("alice@example.org") == [keys.org2]
    assert config.signers_for("bob@example.org") == [keys.org]


def test_earlier_wildcard_shadows_later_exact_line(keys: Keys) -> None:
    config = inline(keys, f"*@example.org {keys.org.name}", f"alice@example.org {keys.org2.name}")
    assert config.signers_for("alice@example.org") == [keys.org]


def test_each_domain_signs_with_its_own_key(keys: Keys) -> None:
    config = inline(keys, f"*@example.org {keys.org.name}", f"*@example.net {keys.net.name}")
    assert config.signers_for("a@example.org") == [keys.org]
    assert config.signers_for("a@example.net") == [keys.net]


def test_plain_signing_table_looks_up_address_then_domain(tmp_path: Path, keys: Keys) -> None:
    table = write(tmp_path / "SigningTable", f"alice@example.org {keys.org2.name}",
                  f"example.org {keys.org.name}")
    config = load(DkimSettings(keys=tuple(keys.key_table()), signing_table=table))
    assert config.signers_for("alice@example.org") == [keys.org2]
    assert config.signers_for("bob@example.org") == [keys.org]


def test_plain_signing_table_takes_star_literally(tmp_path: Path, keys: Keys) -> None:
    table = write(tmp_path / "SigningTable", f"*@example.org {keys.org.name}")
    config = load(DkimSettings(keys=tuple(keys.key_table()), signing_table=table))
    assert config.signers_for("alice@example.org") == []


def test_plain_signing_table_does_not_sign_subdomains(tmp_path: Path, keys: Keys) -> None:
    table = write(tmp_path / "SigningTable", f"example.org {keys.org.name}")
    config = load(DkimSettings(keys=tuple(keys.key_table()), signing_table=table))
    assert config.signers_for("alice@mail.example.org") == []


def test_inline_tables_behave_like_the_seed_files(tmp_path: Path, keys: Keys) -> None:
    from_files = load(seed_settings(tmp_path, keys))
    from_lines = inline(keys, f"*@example.org {SEED_KEY_NAME}",
                        trusted=("127.0.0.1", "localhost", "::1"))
    assert from_lines.keys == from_files.keys
    assert from_lines.rules == from_files.rules
    assert from_lines.trusted == from_files.trusted


def test_comments_and_blank_lines_are_ignored(tmp_path: Path, keys: Keys) -> None:
    key_table = write(tmp_path / "KeyTable", "# OpenDKIM KeyTable", "",
                      f"{SEED_KEY_NAME} example.org:selector1:{keys.org.path}  # seed key", "   ")
    signing = write(tmp_path / "SigningTable", "# who signs", "",
                    f"*@example.org {SEED_KEY_NAME} # everyone")
    config = load(DkimSettings(key_table=key_table, signing_table="refile:" + signing))
    assert list(config.keys) == [SEED_KEY_NAME]
    assert config.signers_for("alice@example.org") == [config.keys[SEED_KEY_NAME]]


def test_missing_key_file_is_an_error_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "keys" / "selector1.private"
    settings = DkimSettings(keys=(f"{SEED_KEY_NAME} example.org:selector1:{missing}",))
    with pytest.raises(DkimError, match=re.escape(str(missing))):
        load_dkim(settings)


def test_missing_key_file_error_names_the_key_table_line(tmp_path: Path) -> None:
    table = write(tmp_path / "KeyTable",
                  f"{SEED_KEY_NAME} example.org:selector1:{tmp_path / 'none.private'}")
    with pytest.raises(DkimError, match=re.escape(f"{table}, line 1")):
        load_dkim(DkimSettings(key_table=table))


def test_opendkim_file_prefix_is_accepted(tmp_path: Path, keys: Keys) -> None:
    table = write(tmp_path / "KeyTable", *keys.key_table())
    assert SEED_KEY_NAME in load(DkimSettings(key_table="file:" + table)).keys


def test_world_readable_key_is_an_error_naming_it(tmp_path: Path, keys: Keys) -> None:
    path = tmp_path / "open.private"
    path.write_bytes(Path(keys.org.path).read_bytes())
    path.chmod(0o644)
    settings = DkimSettings(keys=(f"{SEED_KEY_NAME} example.org:selector1:{path}",))
    with pytest.raises(DkimError, match=re.escape(str(path)) + ".*other"):
        load_dkim(settings)


def test_unknown_key_in_signing_table_names_file_and_line(tmp_path: Path, keys: Keys) -> None:
    settings = seed_settings(tmp_path, keys,
                             signing=(f"*@example.org {SEED_KEY_NAME}",
                                      "*@example.com nokey._domainkey.example.com"))
    with pytest.raises(DkimError, match=re.escape(f"{tmp_path / 'SigningTable'}, line 2")):
        load_dkim(settings)


def test_malformed_key_table_value_names_file_and_line(tmp_path: Path) -> None:
    table = write(tmp_path / "KeyTable", "# keys", f"{SEED_KEY_NAME} example.org:selector1")
    with pytest.raises(DkimError, match=re.escape(f"{table}, line 2")):
        load_dkim(DkimSettings(key_table=table))


def test_missing_table_file_is_an_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(DkimError, match=re.escape(str(tmp_path / "KeyTable"))):
        load_dkim(DkimSettings(key_table=str(tmp_path / "KeyTable")))


def test_sign_forwarded_as_without_a_key_is_an_error(keys: Keys) -> None:
    with pytest.raises(DkimError, match="sign_forwarded_as"):
        inline(keys, sign_forwarded_as="nokey.test")


def test_sign_forwarded_as_uses_first_key_table_entry_of_the_domain(keys: Keys) -> None:
    assert inline(keys, sign_forwarded_as="example.org").sign_forwarded_as == keys.org


def test_dkim_error_is_a_config_error() -> None:
    assert issubclass(DkimError, ConfigError)


def test_disabled_settings_load_nothing() -> None:
    assert load_dkim(DkimSettings()) is None


def test_key_for_finds_a_key_by_domain_and_selector(keys: Keys) -> None:
    config = inline(keys)
    assert config.key_for("EXAMPLE.org") == keys.org
    assert config.key_for("example.org", "selector2") == keys.org2
    assert config.key_for("example.org", "nope") is None


# ------------------------------------------------------------------ key files


def test_generated_key_file_is_private_to_its_owner(keys: Keys) -> None:
    assert stat.S_IMODE(os.stat(keys.org.path).st_mode) == 0o600


def test_generate_key_refuses_to_overwrite(tmp_path: Path) -> None:
    (tmp_path / "sel.private").write_text("precious")
    with pytest.raises(DkimError, match="already exists"):
        generate_key("example.org", "sel", tmp_path, bits=1024)
    assert (tmp_path / "sel.private").read_text() == "precious"


def test_generated_ed25519_key_is_pkcs8_pem_as_opendkim_genkey_writes(keys: Keys) -> None:
    data = Path(keys.ed.path).read_bytes()
    assert data.startswith(b"-----BEGIN PRIVATE KEY-----")
    assert keys.ed.algorithm == "ed25519"


def test_pkcs8_rsa_key_file_loads(tmp_path: Path, keys: Keys) -> None:
    private = serialization.load_pem_private_key(Path(keys.org.path).read_bytes(), None)
    path = tmp_path / "pkcs8.private"
    path.write_bytes(private.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    path.chmod(0o600)
    config = inline_one_key(path)
    assert config.keys[SEED_KEY_NAME].public_key_base64() == keys.org.public_key_base64()


def test_dkimpy_base64_ed25519_seed_file_loads(tmp_path: Path, keys: Keys) -> None:
    path = tmp_path / "seed.private"
    path.write_bytes(keys.ed.private_pem + b"\n")
    path.chmod(0o600)
    assert inline_one_key(path).keys[SEED_KEY_NAME].public_record() == keys.ed.public_record()


def inline_one_key(path: Path) -> DkimConfig:
    return load(DkimSettings(keys=(f"{SEED_KEY_NAME} example.org:selector1:{path}",)))


def test_check_key_file_returns_the_contents(keys: Keys) -> None:
    assert check_key_file(keys.org.path) == Path(keys.org.path).read_bytes()


def test_zone_lines_keep_txt_strings_within_255_bytes(tmp_path: Path) -> None:
    key = generate_key("example.org", "big", tmp_path, bits=2048)
    strings = re.findall(r'"([^"]*)"', key.zone_lines())
    assert max(len(s) for s in strings) <= 255
    assert "".join(strings) == key.public_record()


def test_zone_lines_publish_the_public_record(keys: Keys,
                                              dnsfunc: Callable[..., bytes | None]) -> None:
    assert dnsfunc(f"{keys.org.name}.") == keys.org.public_record().encode()


def test_loaded_rsa_key_carries_its_openssl_parse_and_publishes_the_same_record(
        keys: Keys) -> None:
    """The record comes from the key parsed at load; a plain PEM of it gives the same one."""
    assert isinstance(keys.org.private_pem, PreparedRsaPem)
    plain = DkimKey(keys.org.domain, keys.org.selector, keys.org.path,
                    bytes(keys.org.private_pem), "rsa")
    assert plain.public_record() == keys.org.public_record()
    assert plain == keys.org  # the prepared form is still the PEM text


# ------------------------------------------------------------------ trust


def test_default_trust_is_127_0_0_1_only(keys: Keys) -> None:
    config = inline(keys)
    assert config.is_trusted("127.0.0.1")
    assert not config.is_trusted("::1")
    assert not config.is_trusted("192.0.2.1")


def test_localhost_entry_trusts_both_loopback_addresses(keys: Keys) -> None:
    config = inline(keys, trusted=("localhost",))
    assert config.is_trusted("127.0.0.1") and config.is_trusted("::1")


def test_cidr_entry_trusts_its_network(keys: Keys) -> None:
    config = inline(keys, trusted=("192.0.2.0/24",))
    assert config.is_trusted("192.0.2.77")
    assert not config.is_trusted("192.0.3.1")


def test_negated_entry_excludes_a_host_of_a_trusted_network(keys: Keys) -> None:
    config = inline(keys, trusted=("192.0.2.0/24", "!192.0.2.66"))
    assert config.is_trusted("192.0.2.65")
    assert not config.is_trusted("192.0.2.66")


def test_ipv4_mapped_client_matches_an_ipv4_entry(keys: Keys) -> None:
    assert inline(keys, trusted=("127.0.0.1",)).is_trusted("::ffff:127.0.0.1")


def test_hostname_entries_are_kept_but_never_match(keys: Keys) -> None:
    config = inline(keys, trusted=("mail.example.org", "127.0.0.1"))
    assert config.unresolved_hosts == ("mail.example.org",)
    assert not config.is_trusted("192.0.2.1")


def test_garbage_trusted_entry_is_an_error_naming_the_line(keys: Keys) -> None:
    with pytest.raises(DkimError, match=r"\[dkim\] trusted, line 2"):
        inline(keys, trusted=("127.0.0.1", "300.1.2.3"))


def test_unparseable_client_address_is_not_trusted(keys: Keys) -> None:
    assert not inline(keys).is_trusted("unknown")


# ------------------------------------------------------------------ which mail is signed


def test_untrusted_client_gets_no_signing_table_signature(keys: Keys) -> None:
    signer = DkimSigner(inline(keys, f"*@example.org {SEED_KEY_NAME}"))
    assert signer.signature_headers(MESSAGE, "192.0.2.1") == b""


def test_trusted_client_gets_the_signing_table_signature(keys: Keys) -> None:
    signer = DkimSigner(inline(keys, f"*@example.org {SEED_KEY_NAME}"))
    tags = signature_tags(signer.signature_headers(MESSAGE, "127.0.0.1"))
    assert (tags["d"], tags["s"]) == ("example.org", "selector1")


def test_sign_forwarded_as_signs_mail_from_untrusted_clients(keys: Keys) -> None:
    signer = DkimSigner(inline(keys, sign_forwarded_as="forward.test"))
    tags = signature_tags(signer.signature_headers(MESSAGE, "192.0.2.1"))
    assert (tags["d"], tags["s"]) == ("forward.test", "fwd")


def test_trusted_mail_gets_author_and_forwarder_signatures(keys: Keys) -> None:
    signer = DkimSigner(inline(keys, f"*@example.org {SEED_KEY_NAME}",
                               sign_forwarded_as="forward.test"))
    headers = signer.signature_headers(MESSAGE, "127.0.0.1")
    assert re.findall(rb"\bd=([\w.]+);", headers) == [b"example.org", b"forward.test"]


def test_same_key_from_both_rules_signs_once(keys: Keys) -> None:
    signer = DkimSigner(inline(keys, f"*@example.org {SEED_KEY_NAME}",
                               sign_forwarded_as="example.org"))
    assert signer.signature_headers(MESSAGE, "127.0.0.1").count(b"DKIM-Signature:") == 1


def test_signature_headers_are_crlf_terminated(keys: Keys) -> None:
    headers = DkimSigner(inline(keys, sign_forwarded_as="forward.test")).signature_headers(
        MESSAGE, "192.0.2.1")
    assert headers.startswith(b"DKIM-Signature: ") and headers.endswith(b"\r\n")
    assert b"\n" not in headers.replace(b"\r\n", b"")


def test_present_recommended_headers_are_signed_and_from_oversigned(keys: Keys) -> None:
    signer = DkimSigner(inline(keys, sign_forwarded_as="forward.test"))
    tags = signature_tags(signer.signature_headers(MESSAGE, "192.0.2.1"))
    assert tags["h"].split(":") == ["from", "to", "subject", "date", "from"]


def test_canonicalization_comes_from_the_config(keys: Keys) -> None:
    signer = DkimSigner(inline(keys, sign_forwarded_as="forward.test",
                               canonicalization="simple/relaxed"))
    assert signature_tags(signer.signature_headers(MESSAGE, "192.0.2.1"))["c"] == "simple/relaxed"


def test_signing_failure_is_counted_and_logged_without_content(
        keys: Keys, caplog: pytest.LogCaptureFixture) -> None:
    broken = DkimKey("forward.test", "fwd", "/nowhere", b"not a key", "rsa")
    signer = DkimSigner(DkimConfig(keys={broken.name: broken}, sign_forwarded_as=broken))
    with caplog.at_level(logging.ERROR, logger="mailforward.dkim"):
        assert signer.signature_headers(MESSAGE, "192.0.2.1") == b""
    assert signer.signing_failures == 1
    assert "fwd._domainkey.forward.test" in caplog.text
    assert "alice" not in caplog.text and "DKIM test" not in caplog.text


def test_unparseable_message_is_left_unsigned_not_raised(keys: Keys) -> None:
    signer = DkimSigner(inline(keys, f"*@example.org {SEED_KEY_NAME}"))
    assert signer.signature_headers(b"\x00bad header line\r\n\r\nbody", "127.0.0.1") == b""
    assert signer.signing_failures == 1


# ------------------------------------------------------------------ verification


def signed(keys: Keys, *signing: str, canonicalization: str = "relaxed/simple",
           message: bytes = MESSAGE) -> bytes:
    signer = DkimSigner(inline(keys, *signing, canonicalization=canonicalization))
    headers = signer.signature_headers(message, "127.0.0.1")
    assert headers
    return headers + message


def test_rsa_signature_verifies_with_dkimpy(keys: Keys,
                                            dnsfunc: Callable[..., bytes | None]) -> None:
    assert dkim.verify(signed(keys, f"*@example.org {SEED_KEY_NAME}"), dnsfunc=dnsfunc)


def test_ed25519_signature_verifies_with_dkimpy(keys: Keys,
                                                dnsfunc: Callable[..., bytes | None]) -> None:
    message = signed(keys, f"*@example.org {keys.ed.name}")
    assert b"a=ed25519-sha256" in message
    assert dkim.verify(message, dnsfunc=dnsfunc)


def test_lf_only_message_signature_verifies_with_dkimpy(
        keys: Keys, dnsfunc: Callable[..., bytes | None]) -> None:
    message = signed(keys, f"*@example.org {SEED_KEY_NAME}",
                     message=MESSAGE.replace(b"\r\n", b"\n"))
    assert dkim.verify(message, dnsfunc=dnsfunc)


def test_rsa_signature_verifies_with_mail_dkim(keys: Keys, loopback_dns: LoopbackDNSServer) -> None:
    message = signed(keys, f"*@example.org {SEED_KEY_NAME}")
    assert mail_dkim_verify(message, loopback_dns.port) == [("pass", "example.org")]


def test_simple_simple_signature_verifies_with_mail_dkim(keys: Keys, loopback_dns: LoopbackDNSServer) -> None:
    message = signed(keys, f"*@example.org {SEED_KEY_NAME}", canonicalization="simple/simple")
    assert mail_dkim_verify(message, loopback_dns.port) == [("pass", "example.org")]


def test_added_from_header_breaks_the_oversigned_signature(
        keys: Keys, loopback_dns: LoopbackDNSServer) -> None:
    message = signed(keys, f"*@example.org {SEED_KEY_NAME}")
    forged = message.replace(b"From: Alice", b"From: Mallory <m@evil.test>\r\nFrom: Alice", 1)
    assert mail_dkim_verify(forged, loopback_dns.port) == [("fail", "example.org")]


def test_mail_dkim_reports_a_changed_body_as_fail(keys: Keys, loopback_dns: LoopbackDNSServer) -> None:
    message = signed(keys, f"*@example.org {SEED_KEY_NAME}").replace(b"Hello.", b"Howdy.")
    assert mail_dkim_verify(message, loopback_dns.port) == [("fail", "example.org")]


def test_mail_dkim_reports_an_unsigned_message_as_none(loopback_dns: LoopbackDNSServer) -> None:
    assert mail_dkim_verify(MESSAGE, loopback_dns.port) == [("none", "")]


def arc_sealed(key: DkimKey) -> bytes:
    """MESSAGE sealed by dkimpy (ARC instance 1 needs a prior ``arc=none`` A-R header)."""
    message = b"Authentication-Results: mx.forward.test; arc=none\r\n" + MESSAGE
    headers: list[bytes] = dkim.arc_sign(message, key.selector.encode(), key.domain.encode(),
                            key.private_pem, b"mx.forward.test")
    return b"".join(headers) + message


def test_mail_dkim_arc_verifier_passes_a_dkimpy_seal(keys: Keys, loopback_dns: LoopbackDNSServer) -> None:
    assert mail_dkim_verify_arc(arc_sealed(keys.fwd), loopback_dns.port) == "pass"


def test_mail_dkim_arc_verifier_fails_a_tampered_seal(keys: Keys, loopback_dns: LoopbackDNSServer) -> None:
    tampered = arc_sealed(keys.fwd).replace(b"Hello.", b"Howdy.")
    assert mail_dkim_verify_arc(tampered, loopback_dns.port) == "fail"
