"""Where webhooks may go: the SSRF guard.

A URL is checked when an endpoint is added (statically and by resolving it) and again at
every delivery: the name is resolved, every address is checked, and the request is sent to
a checked address (the name stays in `Host` and TLS SNI), so DNS cannot be changed between
the check and the connection (DNS rebinding).

Refused unless configured: plain http (only to loopback, when loopback is allowed), loopback,
private, shared (CGNAT), link-local, and any other non-public address. Cloud metadata
addresses are refused even when private networks are allowed; only an explicit CIDR in
`allowed_networks` lets one through.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import SplitResult, urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

METADATA = tuple(
    ipaddress.ip_network(n)
    for n in (
        "169.254.169.254/32",  # AWS, GCP, Azure, OpenStack...
        "169.254.170.2/32",  # AWS ECS task metadata
        "100.100.100.200/32",  # Alibaba Cloud
        "fd00:ec2::254/128",  # AWS over IPv6
    )
)


class RefusedURL(ValueError):
    """A webhook URL that may not be called; the message says why and what would allow it."""


@dataclass(frozen=True)
class EgressPolicy:
    allow_loopback: bool = False
    allow_private_networks: bool = False
    allowed_networks: tuple[IPNetwork, ...] = ()

    @classmethod
    def from_settings(
        cls, *, allow_loopback: bool, allow_private_networks: bool, allowed_networks: str
    ) -> EgressPolicy:
        try:
            networks = tuple(
                ipaddress.ip_network(n.strip(), strict=False)
                for n in allowed_networks.split(",")
                if n.strip()
            )
        except ValueError as exc:
            raise ValueError(f"INTEGRATION_ALLOWED_NETWORKS: {exc}") from None
        return cls(allow_loopback, allow_private_networks, networks)


@dataclass(frozen=True)
class Target:
    """A checked URL and the address to connect to."""

    url: str
    scheme: str
    host: str  # as written in the URL (a name or an address)
    port: int
    address: IPAddress
    path: str  # path and query

    @property
    def pinned_url(self) -> str:
        """The URL with the checked address in place of the name."""
        host = f"[{self.address}]" if self.address.version == 6 else str(self.address)
        return f"{self.scheme}://{host}:{self.port}{self.path}"

    @property
    def host_header(self) -> str:
        default = 443 if self.scheme == "https" else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == default else f"{host}:{self.port}"


def kind_of(address: IPAddress) -> str | None:
    """What makes `address` internal ("loopback", "private"...), or None for a public one."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return kind_of(address.ipv4_mapped)
    if any(address in net for net in METADATA):
        return "cloud metadata"
    if address.is_loopback:
        return "loopback"
    if address.is_unspecified or address.is_multicast or address.is_reserved:
        return "reserved"
    if address.is_link_local:
        return "link-local"
    if address.is_private:
        return "private"
    if not address.is_global:
        return "non-public"
    return None


def check_address(url: str, host: str, address: IPAddress, policy: EgressPolicy) -> None:
    if any(address in net for net in policy.allowed_networks):
        return
    kind = kind_of(address)
    if kind is None:
        return
    allowed = (kind == "loopback" and policy.allow_loopback) or (
        kind in ("private", "link-local", "non-public") and policy.allow_private_networks
    )
    if allowed:
        return
    via = "" if host == str(address) else f" ({host} resolves to {address})"
    hint = {
        "loopback": "INTEGRATION_ALLOW_LOOPBACK=true allows it for development",
        "cloud metadata": "only an explicit INTEGRATION_ALLOWED_NETWORKS entry allows it",
        "reserved": "only an explicit INTEGRATION_ALLOWED_NETWORKS entry allows it",
    }.get(kind, "INTEGRATION_ALLOW_PRIVATE_NETWORKS=true or INTEGRATION_ALLOWED_NETWORKS allows it")
    raise RefusedURL(f"refused {url}: {address} is a {kind} address{via}; {hint}")


def parse(url: str, policy: EgressPolicy) -> SplitResult:
    """Static checks: scheme, host, credentials; an address literal is checked at once."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise RefusedURL(f"refused {url}: not a valid URL ({exc})") from None
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise RefusedURL(f"refused {url}: a webhook URL must be https://host/...")
    if parts.username or parts.password:
        raise RefusedURL(f"refused {url}: credentials in the URL are not allowed")
    if port == 0:
        raise RefusedURL(f"refused {url}: port 0")
    literal = _literal(parts.hostname)
    if literal is not None:
        check_address(url, parts.hostname, literal, policy)
    if parts.scheme == "http":
        _check_plain_http(url, parts.hostname, [literal] if literal else [], policy)
    return parts


def _check_plain_http(
    url: str, host: str, addresses: list[IPAddress], policy: EgressPolicy
) -> None:
    loopback_name = host == "localhost" or host.endswith(".localhost")
    loopback = bool(addresses) and all(kind_of(a) == "loopback" for a in addresses)
    if not policy.allow_loopback or not (loopback or (not addresses and loopback_name)):
        raise RefusedURL(
            f"refused {url}: plain http is only allowed to loopback, in development "
            "(INTEGRATION_ALLOW_LOOPBACK=true); use https"
        )


async def resolve(url: str, policy: EgressPolicy, *, dns_timeout: float) -> Target:
    """Check `url` now, DNS included; the Target pins the address that passed."""
    parts = parse(url, policy)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    literal = _literal(host)
    if literal is not None:
        addresses = [literal]
    else:
        try:
            async with asyncio.timeout(dns_timeout):
                infos = await asyncio.get_running_loop().getaddrinfo(
                    host, port, type=socket.SOCK_STREAM
                )
        except (OSError, TimeoutError) as exc:
            raise UnresolvedURL(f"cannot resolve {host}: {exc or 'timed out'}") from None
        addresses = list(dict.fromkeys(ipaddress.ip_address(i[4][0]) for i in infos))
        if not addresses:
            raise UnresolvedURL(f"cannot resolve {host}: no address")
        for address in addresses:  # every address, so that no answer can be internal
            check_address(url, host, address, policy)
        if parts.scheme == "http":
            _check_plain_http(url, host, addresses, policy)
    path = parts.path or "/"
    if parts.query:
        path += f"?{parts.query}"
    return Target(url, parts.scheme, host, port, addresses[0], path)


def literal_target(url: str, policy: EgressPolicy) -> Target | None:
    """The Target of a URL whose host is an address (no DNS to re-check), else None.

    None too when the URL is refused: the refusal is then reported at delivery.
    """
    try:
        parts = parse(url, policy)
    except RefusedURL:
        return None
    address = _literal(parts.hostname or "")
    if address is None:
        return None
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return Target(url, parts.scheme, parts.hostname or "", port, address, path)


class UnresolvedURL(OSError):
    """DNS gave no answer (a transient failure: the delivery is retried)."""


def _literal(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None
