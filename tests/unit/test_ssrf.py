"""The SSRF guard of integration_svc: which webhook URLs may be called, and why not."""

from __future__ import annotations

import ipaddress

import pytest

from integration_svc.egress import EgressPolicy, RefusedURL, kind_of, parse, resolve

STRICT = EgressPolicy()
DEV = EgressPolicy(allow_loopback=True)
PRIVATE = EgressPolicy(allow_private_networks=True)


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("https://169.254.169.254/latest/meta-data/", "169.254.169.254 is a cloud metadata"),
        ("https://[fd00:ec2::254]/", "cloud metadata"),
        ("https://10.0.0.1/hook", "10.0.0.1 is a private address"),
        ("https://192.168.1.20/hook", "private"),
        ("https://[::ffff:10.0.0.1]/hook", "private"),  # IPv4-mapped IPv6
        ("https://169.254.10.10/hook", "link-local"),
        ("https://127.0.0.1/hook", "loopback address; INTEGRATION_ALLOW_LOOPBACK"),
        ("https://[::1]/hook", "loopback"),
        ("https://0.0.0.0/hook", "reserved"),
        ("http://93.184.216.34/hook", "plain http is only allowed to loopback"),
        ("ftp://example.com/x", "must be https://"),
        ("https://user:pw@example.com/x", "credentials"),
        ("https:///nohost", "must be https://"),
    ],
)
def test_internal_or_insecure_urls_are_refused_with_the_reason(url: str, reason: str) -> None:
    with pytest.raises(RefusedURL, match="refused") as refused:
        parse(url, STRICT)
    assert reason in str(refused.value)


async def test_a_name_resolving_to_loopback_is_refused_unless_loopback_is_allowed() -> None:
    with pytest.raises(
        RefusedURL, match=r"loopback address \(localhost resolves to (127\.0\.0\.1|::1)\)"
    ):
        await resolve("https://localhost:8443/hook", STRICT, dns_timeout=2)
    target = await resolve("http://localhost:8443/hook?x=1", DEV, dns_timeout=2)
    assert target.address.is_loopback
    host = "127.0.0.1" if target.address.version == 4 else "[::1]"
    assert target.pinned_url == f"http://{host}:8443/hook?x=1"  # the checked address
    assert target.host_header == "localhost:8443"  # the name the receiver expects


async def test_a_numeric_host_spelling_is_resolved_and_checked() -> None:
    with pytest.raises(RefusedURL, match="loopback"):
        await resolve("https://2130706433/hook", STRICT, dns_timeout=2)  # 127.0.0.1


def test_private_networks_can_be_allowed_but_never_metadata() -> None:
    parse("https://10.0.0.1/hook", PRIVATE)
    parse("https://169.254.10.10/hook", PRIVATE)
    with pytest.raises(RefusedURL, match="cloud metadata"):
        parse("https://169.254.169.254/", PRIVATE)
    with pytest.raises(RefusedURL, match="loopback"):
        parse("https://127.0.0.1/", PRIVATE)


def test_an_explicit_cidr_allows_exactly_its_addresses() -> None:
    policy = EgressPolicy.from_settings(
        allow_loopback=False, allow_private_networks=False, allowed_networks="10.20.0.0/16, ::2/128"
    )
    parse("https://10.20.3.4/hook", policy)
    with pytest.raises(RefusedURL):
        parse("https://10.21.0.1/hook", policy)
    with pytest.raises(ValueError, match="INTEGRATION_ALLOWED_NETWORKS"):
        EgressPolicy.from_settings(
            allow_loopback=False, allow_private_networks=False, allowed_networks="10.0.0.0/33"
        )


def test_public_https_urls_pass() -> None:
    parse("https://93.184.216.34/hook", STRICT)
    parse("https://hooks.example.com/x", STRICT)  # names are checked when resolved
    assert kind_of(ipaddress.ip_address("8.8.8.8")) is None
    assert kind_of(ipaddress.ip_address("100.64.0.1")) == "non-public"  # shared (CGNAT)
