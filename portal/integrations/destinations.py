"""Where a webhook may POST: public addresses only, unless an admin names the host.

A webhook URL is resolved and refused when any of its addresses is private, loopback,
link-local (cloud metadata at 169.254.169.254 included), multicast, reserved or unspecified
(0.0.0.0, ::), or when its host is a known metadata name. ``LOWMAG_WEBHOOK_ALLOWED_HOSTS``
(host names, addresses or networks such as ``10.20.0.0/16``) lets an admin allow an internal
receiver on purpose. Delivery connects to the address checked here, so a DNS answer that
changes between the check and the connection cannot redirect it.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

from django.conf import settings

METADATA_HOSTS = {
    "metadata",
    "metadata.google.internal",
    "metadata.goog",
    "instance-data",
    "instance-data.ec2.internal",
}

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class UnsafeDestinationError(ValueError):
    """The webhook URL points somewhere this server must not send requests."""


@dataclass(frozen=True)
class Destination:
    scheme: str
    host: str  # as written in the URL (for Host and TLS)
    port: int
    address: str  # the checked IP address to connect to
    target: str  # path and query

    @property
    def host_header(self) -> str:
        default = 443 if self.scheme == "https" else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == default else f"{host}:{self.port}"


def _allowed_by_admin(host: str, address: IPAddress | None) -> bool:
    for entry in getattr(settings, "LOWMAG_WEBHOOK_ALLOWED_HOSTS", []):
        entry = entry.strip().lower()
        if entry == host:
            return True
        if address is not None:
            try:
                if address in ipaddress.ip_network(entry, strict=False):
                    return True
            except ValueError:
                continue
    return False


def _forbidden(address: IPAddress) -> str | None:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    for label, flag in (
        ("unspecified", address.is_unspecified),
        ("loopback", address.is_loopback),
        ("link-local (cloud metadata)", address.is_link_local),
        ("private", address.is_private),
        ("multicast", address.is_multicast),
        ("reserved", address.is_reserved),
        ("not globally routable", not address.is_global),
    ):
        if flag:
            return label
    return None


def _parse(url: str) -> tuple[str, str, int, str]:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise UnsafeDestinationError(f"{url[:100]!r} is not an http(s) URL")
    host = (parts.hostname or "").rstrip(".").lower()
    if not host:
        raise UnsafeDestinationError("the URL has no host")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as exc:
        raise UnsafeDestinationError(f"the URL's port is not valid: {exc}") from exc
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    return parts.scheme, host, port, target


def _check_address(host: str, address: IPAddress) -> None:
    reason = _forbidden(address)
    if reason and not _allowed_by_admin(host, address):
        raise UnsafeDestinationError(
            f"{host} resolves to {address}, a {reason} address; webhooks go to public "
            "addresses only (an admin may allow it in LOWMAG_WEBHOOK_ALLOWED_HOSTS)"
        )


def resolve(url: str) -> Destination:
    """Check ``url`` and pick the address to connect to; raises ``UnsafeDestinationError``."""
    scheme, host, port, target = _parse(url)
    if host in METADATA_HOSTS and not _allowed_by_admin(host, None):
        raise UnsafeDestinationError(f"{host} is a cloud metadata service")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise UnsafeDestinationError(f"{host} cannot be resolved ({exc})") from exc
    addresses = [ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos]
    for address in addresses:  # every answer must be allowed, not just the first
        _check_address(host, address)
    return Destination(scheme, host, port, str(addresses[0]), target)


def check_registration(url: str) -> None:
    """At registration: refuse forbidden literals and names that resolve to forbidden
    addresses. A name that does not resolve yet is accepted; each delivery checks again."""
    scheme, host, port, _ = _parse(url)
    try:
        literal = ipaddress.ip_address(host)
    except ValueError:
        literal = None
    if literal is not None:
        _check_address(host, literal)
        return
    try:
        resolve(url)
    except UnsafeDestinationError as exc:
        if "cannot be resolved" not in str(exc):
            raise
