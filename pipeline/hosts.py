"""Which hosts a URL from an input file may reach: http(s) only, and public addresses only unless the
user allows private ones — so a candidate list cannot make the pipeline probe internal services
(loopback, private networks, cloud metadata at 169.254.169.254)."""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlparse


class HostRefused(ValueError):
    """`str(e)` says why (for `bad_url`: the scheme found); `kind` is `bad_url`, `unresolved` or
    `blocked_host`."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def check_public_url(url: str, allow_private_hosts: bool = False) -> None:
    """Raises HostRefused unless `url` is http(s) and every address its host resolves to is public
    (any host when `allow_private_hosts`)."""
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise HostRefused("bad_url", parsed.scheme or "no scheme")
    if allow_private_hosts:
        return
    try:
        infos = socket.getaddrinfo(parsed.hostname, None)
    except (socket.gaierror, UnicodeError) as e:
        raise HostRefused("unresolved", f"cannot resolve host {parsed.hostname} ({e})") from e
    for info in infos:
        address = ipaddress.ip_address(info[4][0].split("%")[0])
        if not address.is_global:
            raise HostRefused("blocked_host", f"{parsed.hostname} resolves to non-public {address}")
