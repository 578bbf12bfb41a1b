"""Which links a provider gives may be fetched (an image's URL, a redirect's Location), and where the
request then goes.

A provider that someone else controls (a compromised OpenAI-compatible server, a community model's
output) could name any address: the service would fetch it from inside its network (on Fargate: the
task metadata endpoint, every service of the VPC) and store what came back for the caller to
download. So a link is fetched only when its origin is the provider's own, when its host is one the
operator allowed (IMAGE_FETCH_ALLOWED_HOSTS), or when every address its host resolves to is public;
and then it goes to the very address that was checked, so that a second lookup (DNS rebinding)
cannot send it elsewhere.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import Awaitable, Callable, Iterable
from typing import NamedTuple

import anyio
import httpx

from generators import GenerationError
from providers.answers import origin, shown

log = logging.getLogger(__name__)

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolve = Callable[[str, int], Awaitable[list[str]]]
NAT64 = ipaddress.ip_network("64:ff9b::/96")
DEFAULT_PORTS = {"http": 80, "https": 443}


class AllowedHost(NamedTuple):
    host: str
    port: int | None  # None: every port


def allowed_host(entry: str) -> AllowedHost:
    """An IMAGE_FETCH_ALLOWED_HOSTS entry: `host` or `host:port`, an IPv6 address in brackets."""
    try:
        url = httpx.URL(f"http://{entry.strip()}")
    except httpx.InvalidURL:
        url = None
    if url is None or not url.host or url.userinfo or url.raw_path != b"/" or url.query or url.fragment:
        raise ValueError(f"{entry.strip()!r} is not a host or host:port")
    return AllowedHost(normal_host(url), url.port)


def normal_host(url: httpx.URL) -> str:
    """The host as DNS knows it: IDNA-encoded, lower case, without a trailing dot."""
    return url.raw_host.decode("ascii").lower().rstrip(".")


def is_public(address: Address) -> bool:
    """Whether an address is on the public internet: not loopback, private, link-local (169.254.169.254, the
    ECS task metadata 169.254.170.2), shared, reserved or multicast, nor an IPv6 address carrying such an IPv4
    address (IPv4-mapped, 6to4, Teredo, NAT64)."""
    if isinstance(address, ipaddress.IPv6Address):
        teredo = address.teredo
        embedded = address.ipv4_mapped or address.sixtofour or (teredo[1] if teredo else None)
        if address in NAT64:
            embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if embedded is not None and not is_public(embedded):
            return False
    return address.is_global and not address.is_multicast


async def resolve_host(host: str, port: int) -> list[str]:
    """The addresses `host` resolves to, in the system's order of preference (one lookup, in a worker thread)."""
    answers = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(sockaddr[0]).partition("%")[0] for *_, sockaddr in answers))


def refused_link(url: httpx.URL, why: str) -> GenerationError:
    # The origin only: a link's path and query may carry a signature, and are the provider's to choose.
    log.warning("image generator sent a link to %s, which the service will not fetch: %s", shown(origin(url)), why)
    return GenerationError(502, "image generator sent a link the service will not fetch", "bad_image")


class Links:
    """The rule for the links of one provider, whose API is at `own_origin`."""

    def __init__(self, own_origin: str, allowed_hosts: Iterable[AllowedHost] = (), resolve: Resolve = resolve_host):
        own = httpx.URL(own_origin)
        self.own = (own.scheme, normal_host(own), port_of(own))
        self.allowed_hosts = tuple(allowed_hosts)
        self.resolve = resolve

    def is_own(self, url: httpx.URL) -> bool:
        return (url.scheme, normal_host(url), port_of(url)) == self.own

    def is_allowed(self, url: httpx.URL) -> bool:
        host, port = normal_host(url), port_of(url)
        return any(allowed.host == host and allowed.port in (None, port) for allowed in self.allowed_hosts)

    async def checked(self, request: httpx.Request) -> httpx.Request:
        """`request` as it may be sent: as it is to the provider's own origin or an allowed host; to a public
        address, sent to the address checked; anything else refused (502), and nothing sent."""
        url = request.url
        if url.scheme not in DEFAULT_PORTS or not url.host or url.userinfo:
            raise refused_link(url, "not an http(s) URL with a host and without credentials")
        if self.is_own(url) or self.is_allowed(url):
            return request
        host = url.raw_host.decode("ascii")
        try:
            addresses = [ipaddress.ip_address(address) for address in await self.resolve(host, port_of(url))]
        except (OSError, ValueError):  # socket.gaierror is an OSError
            raise refused_link(url, "its host does not resolve") from None
        if not addresses or not all(is_public(address) for address in addresses):
            private = ", ".join(str(address) for address in addresses if not is_public(address))
            raise refused_link(url, f"it resolves to {private}, not a public address (IMAGE_FETCH_ALLOWED_HOSTS)")
        return pinned(request, addresses[0])


def port_of(url: httpx.URL) -> int:
    return url.port or DEFAULT_PORTS.get(url.scheme, 0)


def pinned(request: httpx.Request, address: Address) -> httpx.Request:
    """`request` sent to `address`, with the Host header and TLS server name of its URL. Its connection is
    closed after it, so that no other request, for another host at that address, reuses it."""
    headers = httpx.Headers(request.headers)
    headers["Connection"] = "close"
    extensions = {**request.extensions, "sni_hostname": request.url.raw_host.decode("ascii")}
    url = request.url.copy_with(host=str(address))
    return httpx.Request(request.method, url, headers=headers, content=request.content, extensions=extensions)
