"""``mailforward dns`` and ``mailforward check DOMAIN`` against a real DNS server on loopback.

The good zone is what ``mailforward dns`` itself prints, plus the PTR the
hosting provider would publish; each broken zone changes one thing, and the
check must fail exactly that item with a reason a newcomer can act on.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from mailforward.admin import Admin
from mailforward.auth.dkim import DkimKey, generate_key
from mailforward.auth.dmarc import parse_record
from mailforward.cli import main
from mailforward.config import Settings, build_settings, load_settings
from mailforward.dns import make_resolver
from mailforward.dnstools import (
    DEDICATED_DOMAIN_ITEM,
    SPF_TOO_MANY_LOOKUPS,
    Record,
    check_ptr,
    records_for,
    spf_value,
)
from mailforward.tables import open_admin_database

from smtp_harness import serve_zone

DOMAIN = "example.org"
HOSTNAME = "mail.example.net"
SRS_DOMAIN = "srs.example.net"
PUBLIC_IP = "192.0.2.10"
PTR_NAME = "10.2.0.192.in-addr.arpa."

Check = Callable[..., Result]


@pytest.fixture(scope="module")
def dkim_keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[DkimKey, DkimKey]:
    """Our signing key and a stranger's, generated once (RSA generation is slow)."""
    directory = tmp_path_factory.mktemp("dkim")
    ours = generate_key(DOMAIN, "sel", directory, bits=1024)
    other = generate_key(DOMAIN, "other", directory, bits=1024)
    return ours, other


@pytest.fixture
def database(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path}/mailforward.db"

    async def seed() -> None:
        db = await open_admin_database(build_settings({"database": {"url": url}}).database)
        try:
            admin = Admin(db)
            await admin.init_schema()
            await admin.add_domain(DOMAIN)
        finally:
            await db.close()

    asyncio.run(seed())
    return url


def write_config(tmp_path: Path, database: str, nameserver: str, key_dir: Path,
                 public_ips: str = f'["{PUBLIC_IP}"]', srs: str = SRS_DOMAIN,
                 dkim_extra: str = "", extra: str = "") -> Path:
    config = tmp_path / "mailforward.toml"
    config.write_text(f"""
[server]
hostname = "{HOSTNAME}"
listen = ["127.0.0.1:2525"]
public_ips = {public_ips}

[database]
url = "{database}"

[delivery]
nameservers = ["{nameserver}"]
dns_timeout = 2

[srs]
domain = "{srs}"

[dkim]
keys = ["sel._domainkey.{DOMAIN} {DOMAIN}:sel:{key_dir / 'sel.private'}"]
signing = ["*@{DOMAIN} sel._domainkey.{DOMAIN}"]
{dkim_extra}
{extra}
""")
    return config


def settings_for(tmp_path: Path, database: str, key_dir: Path) -> Settings:
    return load_settings(write_config(tmp_path, database, "127.0.0.1:53", key_dir), environ={})


def good_zone(tmp_path: Path, database: str, key: DkimKey) -> str:
    """Exactly what ``mailforward dns`` prints, PTR included (the provider would publish that)."""
    return records_for(DOMAIN, settings_for(tmp_path, database, Path(key.path).parent)).zone_text()


def replace_line(zone: str, starts: str, new: str = "") -> str:
    """The zone with every record line starting with ``starts`` replaced by ``new``."""
    lines = [new if line.startswith(starts) else line for line in zone.splitlines()]
    return "\n".join(line for line in lines if line) + "\n"


@pytest.fixture
def check(tmp_path: Path, database: str,
          dkim_keys: tuple[DkimKey, DkimKey]) -> Iterator[Check]:
    """Run ``mailforward check`` (or any command) against a zone served on loopback."""
    key_dir = Path(dkim_keys[0].path).parent
    with ExitStack() as servers:
        def run(zone: str, *args: str, servfail: tuple[str, ...] = (), **config: str) -> Result:
            server = servers.enter_context(serve_zone(zone, servfail))
            path = write_config(tmp_path, database, server.nameserver, key_dir, **config)
            return CliRunner().invoke(main, ["--config", str(path), *(args or ("check", DOMAIN))],
                                      catch_exceptions=False)

        yield run


@pytest.fixture
def zone(tmp_path: Path, database: str, dkim_keys: tuple[DkimKey, DkimKey]) -> str:
    return good_zone(tmp_path, database, dkim_keys[0])


def failures(result: Result) -> dict[str, str]:
    """Failed items from ``--json`` output: item -> reason."""
    report = json.loads(result.output)
    return {c["item"]: c["reason"] for c in report["checks"] if not c["ok"]}


def check_json(check: Check, zone: str, **options: object) -> Result:
    return check(zone, "check", DOMAIN, "--json", **options)


# ---------------------------------------------------------------- dns


def test_dns_prints_the_records_in_zone_file_format(check: Check, zone: str) -> None:
    result = check("", "dns", DOMAIN)
    assert result.exit_code == 0
    assert f"{DOMAIN}.\t3600\tIN\tMX\t10 {HOSTNAME}." in result.output
    assert f'{DOMAIN}.\t3600\tIN\tTXT\t"v=spf1 ip4:{PUBLIC_IP} -all"' in result.output
    assert f'_dmarc.{DOMAIN}.\t3600\tIN\tTXT\t"v=DMARC1; p=none"' in result.output
    assert f"sel._domainkey.{DOMAIN}.\t3600\tIN\tTXT\t\"v=DKIM1; k=rsa; p=" in result.output
    assert f"{SRS_DOMAIN}.\t3600\tIN\tMX\t10 {HOSTNAME}." in result.output
    assert f"{HOSTNAME}.\t3600\tIN\tA\t{PUBLIC_IP}" in result.output


def test_dns_json_carries_the_dkim_public_key_from_the_private_key(
        check: Check, dkim_keys: tuple[DkimKey, DkimKey]) -> None:
    result = check("", "dns", DOMAIN, "--json")
    assert result.exit_code == 0
    records = json.loads(result.output)["records"]
    dkim = [r for r in records if r["name"] == f"sel._domainkey.{DOMAIN}."]
    assert [r["value"] for r in dkim] == [dkim_keys[0].public_record()]


def test_dns_without_public_ips_prints_a_note_and_spf_mx(check: Check) -> None:
    result = check("", "dns", DOMAIN, public_ips="[]")
    assert result.exit_code == 0
    assert "; NOTE: set [server] public_ips" in result.output
    assert '"v=spf1 mx -all"' in result.output


def test_dns_refuses_a_bad_domain_with_exit_2(check: Check) -> None:
    assert check("", "dns", "not a domain").exit_code == 2


def test_long_txt_values_are_split_into_255_octet_strings() -> None:
    record = Record("k.example.org.", "TXT", "p=" + "A" * 300, "test")
    assert record.zone_value() == f'"p={"A" * 253}" "{"A" * 47}"'


def test_spf_lists_each_public_ip_by_family() -> None:
    assert spf_value(["192.0.2.10", "2001:db8::1"]) == "v=spf1 ip4:192.0.2.10 ip6:2001:db8::1 -all"


# ---------------------------------------------------------------- check: the good zone


def test_check_passes_every_item_on_the_zone_dns_prints(check: Check, zone: str) -> None:
    result = check(zone)
    assert result.exit_code == 0, result.output
    items = [line.split(" — ")[0] for line in result.output.splitlines()[:-1]]
    assert items == ["✓ MX", "✓ SPF", "✓ SPF (SRS domain)", "✓ DMARC", "✓ DKIM sel",
                     "✓ database", "✓ PTR", f"✓ {DEDICATED_DOMAIN_ITEM}"]
    assert result.output.splitlines()[-1] == "all 8 checks passed"


def test_check_json_reports_ok_and_one_object_per_item(check: Check, zone: str) -> None:
    report = json.loads(check_json(check, zone).output)
    assert report["ok"] is True
    assert len(report["checks"]) == 8
    assert set(report["checks"][0]) == {"item", "ok", "reason", "warning"}


# ---------------------------------------------------------------- check: one broken item each


def test_missing_mx_fails_only_the_mx_item(check: Check, zone: str) -> None:
    result = check_json(check, replace_line(zone, f"{DOMAIN}.\t3600\tIN\tMX"))
    assert result.exit_code == 1
    assert failures(result) == {"MX": f"{DOMAIN} has no MX record; publish "
                                      f"'{DOMAIN}. MX 10 {HOSTNAME}.'"}


def test_mx_to_another_host_fails_only_the_mx_item(check: Check, zone: str) -> None:
    broken = replace_line(zone, f"{DOMAIN}.\t3600\tIN\tMX",
                          f"{DOMAIN}. 3600 IN MX 10 other.example.com.\n"
                          "other.example.com. 3600 IN A 198.51.100.7")
    reasons = failures(check_json(check, broken))
    assert list(reasons) == ["MX"]
    assert "other.example.com resolves to 198.51.100.7, not to this server" in reasons["MX"]


def test_spf_without_our_ip_fails_only_the_spf_item(check: Check, zone: str) -> None:
    broken = replace_line(zone, f'{DOMAIN}.\t3600\tIN\tTXT',
                          f'{DOMAIN}. 3600 IN TXT "v=spf1 ip4:198.51.100.7 -all"')
    reasons = failures(check_json(check, broken))
    assert list(reasons) == ["SPF"]
    assert reasons["SPF"] == (f"SPF of {DOMAIN} does not authorise this server's address "
                              f"{PUBLIC_IP} (result: fail); add ip4:{PUBLIC_IP} to the record")


def test_spf_over_ten_lookups_fails_with_the_rfc_7208_limit(check: Check, zone: str) -> None:
    hosts = [f"h{n}.{DOMAIN}" for n in range(11)]
    terms = " ".join(f"a:{host}" for host in hosts)
    broken = replace_line(zone, f'{DOMAIN}.\t3600\tIN\tTXT',
                          f'{DOMAIN}. 3600 IN TXT "v=spf1 {terms} ip4:{PUBLIC_IP} -all"\n'
                          + "\n".join(f"{host}. 3600 IN A 198.51.100.{n}"
                                      for n, host in enumerate(hosts)))
    assert failures(check_json(check, broken)) == {"SPF": SPF_TOO_MANY_LOOKUPS}


def test_srs_domain_spf_without_our_ip_fails_only_the_srs_spf_item(check: Check, zone: str) -> None:
    broken = replace_line(zone, f"{SRS_DOMAIN}.\t3600\tIN\tTXT")
    reasons = failures(check_json(check, broken))
    assert list(reasons) == ["SPF (SRS domain)"]
    assert reasons["SPF (SRS domain)"].startswith(f"{SRS_DOMAIN} has no SPF record")


def test_srs_off_fails_the_srs_spf_item(check: Check, zone: str) -> None:
    reasons = failures(check_json(check, zone, srs=""))
    assert list(reasons) == ["SPF (SRS domain)"]
    assert reasons["SPF (SRS domain)"].startswith("SRS is off: set [srs] domain")


def test_missing_dmarc_fails_only_the_dmarc_item(check: Check, zone: str) -> None:
    reasons = failures(check_json(check, replace_line(zone, f"_dmarc.{DOMAIN}.")))
    assert reasons == {"DMARC": f"no DMARC record at _dmarc.{DOMAIN}; publish "
                                f"'_dmarc.{DOMAIN}. TXT \"v=DMARC1; p=none\"'"}


def test_malformed_dmarc_fails_only_the_dmarc_item(check: Check, zone: str) -> None:
    broken = replace_line(zone, f"_dmarc.{DOMAIN}.",
                          f'_dmarc.{DOMAIN}. 3600 IN TXT "v=DMARC1; p=maybe"')
    assert failures(check_json(check, broken)) == {
        "DMARC": f"the DMARC record at _dmarc.{DOMAIN} is malformed: "
                 "p=maybe is not one of none, quarantine, reject"}


def test_two_dmarc_records_fail_the_dmarc_item(check: Check, zone: str) -> None:
    broken = replace_line(zone, f"_dmarc.{DOMAIN}.",
                          f'_dmarc.{DOMAIN}. 3600 IN TXT "v=DMARC1; p=none"\n'
                          f'_dmarc.{DOMAIN}. 3600 IN TXT "v=DMARC1; p=reject"')
    assert list(failures(check_json(check, broken))) == ["DMARC"]


def test_dkim_key_mismatch_fails_only_the_dkim_item(
        check: Check, zone: str, dkim_keys: tuple[DkimKey, DkimKey]) -> None:
    stranger = Record(f"sel._domainkey.{DOMAIN}.", "TXT", dkim_keys[1].public_record(), "")
    broken = replace_line(zone, f"sel._domainkey.{DOMAIN}.", stranger.zone_line())
    reasons = failures(check_json(check, broken))
    assert list(reasons) == ["DKIM sel"]
    assert "does not match our private key" in reasons["DKIM sel"]


def test_missing_dkim_record_fails_only_the_dkim_item(check: Check, zone: str) -> None:
    reasons = failures(check_json(check, replace_line(zone, f"sel._domainkey.{DOMAIN}.")))
    assert list(reasons) == ["DKIM sel"]
    assert reasons["DKIM sel"].startswith(f"no DKIM record at sel._domainkey.{DOMAIN}")


def test_missing_ptr_fails_only_the_ptr_item(check: Check, zone: str) -> None:
    reasons = failures(check_json(check, replace_line(zone, PTR_NAME)))
    assert reasons == {"PTR": f"{PUBLIC_IP} has no PTR record; ask your hosting provider to "
                              f"set it to {HOSTNAME}"}


def test_ptr_naming_another_host_fails_only_the_ptr_item(check: Check, zone: str) -> None:
    broken = replace_line(zone, PTR_NAME, f"{PTR_NAME} 3600 IN PTR host.provider.example.")
    assert failures(check_json(check, broken)) == {
        "PTR": f"the PTR of {PUBLIC_IP} is host.provider.example, not {HOSTNAME}"}


def test_domain_missing_from_the_database_fails_only_the_database_item(
        check: Check, zone: str) -> None:
    assert check(zone, "domain", "remove", DOMAIN).exit_code == 0
    assert failures(check_json(check, zone)) == {
        "database": f"{DOMAIN} is not in the database; add it with 'mailforward domain add {DOMAIN}'"}


def test_inactive_domain_fails_the_database_item_saying_inactive(check: Check, zone: str) -> None:
    assert check(zone, "domain", "disable", DOMAIN).exit_code == 0
    assert failures(check_json(check, zone)) == {
        "database": f"{DOMAIN} is in the database but inactive; enable it with "
                    f"'mailforward domain enable {DOMAIN}'"}


def test_servfail_is_a_temporary_failure_of_that_item_not_a_crash(check: Check, zone: str) -> None:
    reasons = failures(check_json(check, zone, servfail=(f"_dmarc.{DOMAIN}",)))
    assert list(reasons) == ["DMARC"]
    assert reasons["DMARC"].startswith("DNS lookup failed (temporary): ")


def test_without_public_ips_the_ip_items_ask_for_them(check: Check, zone: str) -> None:
    reasons = failures(check_json(check, zone, public_ips="[]"))
    assert list(reasons) == ["MX", "SPF", "SPF (SRS domain)", "PTR"]
    assert all("set [server] public_ips" in reason for reason in reasons.values())


# ---------------------------------------------------------------- arguments


def test_check_without_domain_or_smtp_exits_2(check: Check) -> None:
    assert check("", "check").exit_code == 2


def test_check_with_a_bad_domain_exits_2(check: Check) -> None:
    assert check("", "check", "no_such..domain").exit_code == 2


def test_dmarc_without_policy_is_malformed() -> None:
    assert parse_record("v=DMARC1; rua=mailto:d@example.org").problem == \
        "the p= tag (none, quarantine or reject) is missing"


def test_dmarc_must_start_with_the_version_tag() -> None:
    assert parse_record("p=none; v=DMARC1").problem == "the first tag must be v=DMARC1"


async def test_ptr_whose_hostname_does_not_resolve_back_fails_fcrdns() -> None:
    zone = (f"{PTR_NAME} 3600 IN PTR {HOSTNAME}.\n"
            f"{HOSTNAME}. 3600 IN A 198.51.100.7\n")
    with serve_zone(zone) as server:
        result = await check_ptr(make_resolver([server.nameserver], 2), HOSTNAME, [PUBLIC_IP])
    assert result.reason == (f"{HOSTNAME} does not resolve back to {PUBLIC_IP}: add "
                             f"'{HOSTNAME}. A {PUBLIC_IP}'")


# ---------------------------------------------------------------- a dedicated forwarding domain


def warnings_of(result: Result) -> dict[str, str]:
    """Warning items from ``--json`` output: item -> reason."""
    report = json.loads(result.output)
    return {c["item"]: c["reason"] for c in report["checks"] if c["warning"]}


def test_dns_warns_when_the_srs_domain_is_the_hosted_domain(check: Check) -> None:
    result = check("", "dns", DOMAIN, srs=DOMAIN)
    assert result.exit_code == 0
    assert f"; WARNING: [srs] domain {DOMAIN} is the hosted domain {DOMAIN}: " in result.output


def test_dns_warns_when_sign_forwarded_as_shares_the_hosted_organizational_domain(
        check: Check, dkim_keys: tuple[DkimKey, DkimKey]) -> None:
    key = dkim_keys[0]
    assert check("", "domain", "add", f"mail.{DOMAIN}").exit_code == 0
    result = check("", "dns", f"mail.{DOMAIN}", "--json",
                   dkim_extra=f'sign_forwarded_as = "{DOMAIN}"')
    assert json.loads(result.output)["warnings"] == [(
        f"[dkim] sign_forwarded_as {key.domain} shares its organizational domain with the "
        f"hosted domain mail.{DOMAIN}: every forwarded message carries a valid signature for "
        f"it, so mail forged as From: someone@mail.{DOMAIN} would pass DMARC at the "
        "destination; use a dedicated domain no user writes From in, e.g. fwd.example.net "
        "when you host example.org")]


def test_dns_warns_when_the_arc_domain_is_the_hosted_domain(check: Check) -> None:
    result = check("", "dns", DOMAIN, extra=f'[arc]\ndomain = "{DOMAIN}"\nselector = "sel"')
    assert f"; WARNING: [arc] domain {DOMAIN} is the hosted domain {DOMAIN}: " in result.output


def test_dns_does_not_warn_about_a_dedicated_srs_domain(check: Check) -> None:
    assert "WARNING" not in check("", "dns", DOMAIN).output


def test_check_reports_a_hosted_srs_domain_as_a_warning_not_a_failure(
        check: Check, zone: str) -> None:
    result = check(zone, srs=DOMAIN)
    assert result.exit_code == 0
    assert f"! {DEDICATED_DOMAIN_ITEM} — [srs] domain {DOMAIN} is the hosted domain" \
        in result.output


def test_check_warns_when_the_srs_domain_is_another_hosted_domain(
        check: Check, zone: str) -> None:
    assert check(zone, "domain", "add", "other.example").exit_code == 0
    reasons = warnings_of(check_json(check, zone, srs="fwd.other.example"))
    assert reasons[DEDICATED_DOMAIN_ITEM].startswith(
        "[srs] domain fwd.other.example shares its organizational domain with the hosted "
        "domain other.example")


def test_check_passes_the_dedicated_domain_item_for_a_dedicated_srs_domain(
        check: Check, zone: str) -> None:
    report = json.loads(check_json(check, zone).output)
    item, = [c for c in report["checks"] if c["item"] == DEDICATED_DOMAIN_ITEM]
    assert (item["ok"], item["warning"]) == (True, False)


def test_dns_refuses_a_domain_that_is_not_hosted(check: Check, zone: str) -> None:
    result = check("", "dns", "elsewhere.test")
    assert result.exit_code == 1 and "not a hosted domain" in result.output


def test_dns_refuses_a_hostname_that_is_not_fully_qualified(check: Check, zone: str,
                                                             tmp_path: Path) -> None:
    assert check("", "dns", DOMAIN).exit_code == 0  # writes the config file
    result = CliRunner().invoke(main, ["--config", str(tmp_path / "mailforward.toml"), "dns", DOMAIN],
                                env={"MAILFORWARD_SERVER__HOSTNAME": "vm"})
    assert result.exit_code == 2 and "[server] hostname: 'vm'" in result.output
