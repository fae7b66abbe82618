"""Independent DKIM and ARC verdicts from Perl's Mail::DKIM, for tests.

dkimpy both signs and verifies in our code, so a dkimpy verdict alone could
hide a shared bug; Mail::DKIM is a second implementation.  Its resolver is
pointed at the loopback DNS server only (``tests/dns_server.py``), never at
the machine's own.  A missing perl or Mail::DKIM fails the test with the
package to install: CI installs ``libmail-dkim-perl``.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest

TIMEOUT = 30

# Shared prologue: a resolver that asks 127.0.0.1:<port> only, then the
# message from stdin with CRLF line endings, as Mail::DKIM expects.
_PROLOGUE = r"""
use strict;
use warnings;
use Net::DNS::Resolver;
use Mail::DKIM::Verifier;
use Mail::DKIM::ARC::Verifier;
my $port = shift @ARGV;
Mail::DKIM::DNS::resolver(Net::DNS::Resolver->new(
    nameservers => ['127.0.0.1'], port => $port, recurse => 1, defnames => 0,
    dnsrch => 0, searchlist => [], retry => 1, udp_timeout => 5, tcp_timeout => 5));
sub feed {
    my ($verifier) = @_;
    binmode STDIN;
    while (my $line = <STDIN>) {
        $line =~ s/\r?\n\z/\015\012/;
        $verifier->PRINT($line);
    }
    $verifier->CLOSE;
}
"""

_DKIM_SCRIPT = _PROLOGUE + r"""
my $verifier = Mail::DKIM::Verifier->new();
feed($verifier);
my @signatures = $verifier->signatures;
print "none\t\n" unless @signatures;
foreach my $signature (@signatures) {
    print $signature->result, "\t", ($signature->domain // ""), "\n";
}
"""

_ARC_SCRIPT = _PROLOGUE + r"""
my $verifier = Mail::DKIM::ARC::Verifier->new();
feed($verifier);
print $verifier->result, "\n";
"""


def _run_perl(script: str, message: bytes, nameserver_port: int) -> str:
    if shutil.which("perl") is None:
        pytest.fail("perl is not installed (apt-get install perl libmail-dkim-perl)")
    try:
        done = subprocess.run(["perl", "-e", script, str(nameserver_port)], input=message,
                              capture_output=True, timeout=TIMEOUT, check=False)
    except subprocess.TimeoutExpired:
        pytest.fail(f"perl Mail::DKIM did not finish within {TIMEOUT} s")
    stderr = done.stderr.decode("utf-8", "replace")
    if "Can't locate" in stderr:
        pytest.fail(f"Mail::DKIM is missing (apt-get install libmail-dkim-perl): {stderr}")
    if done.returncode != 0:
        pytest.fail(f"perl Mail::DKIM exited {done.returncode}: {stderr}")
    return done.stdout.decode("utf-8", "replace")


def mail_dkim_verify(message: bytes, nameserver_port: int) -> list[tuple[str, str]]:
    """[(result, domain)] per DKIM-Signature, as Mail::DKIM::Verifier sees them.

    Results are Mail::DKIM's words: "pass", "fail", "invalid", "temperror"...;
    a message without signatures gives [("none", "")].
    """
    output = _run_perl(_DKIM_SCRIPT, message, nameserver_port)
    verdicts = []
    for line in output.splitlines():
        result, _, domain = line.partition("\t")
        verdicts.append((result, domain))
    return verdicts


def mail_dkim_verify_arc(message: bytes, nameserver_port: int) -> str:
    """Mail::DKIM::ARC::Verifier's chain result: "pass", "fail" or "none"."""
    return _run_perl(_ARC_SCRIPT, message, nameserver_port).strip()
