"""Resolve an ``audio_url`` to bytes under the server's media rules.

- ``data:`` URIs (base64; audio/*, video/*, application/octet-stream or
  application/ogg) are always accepted.
- ``http(s)://`` only for hosts listed exactly in ``allowed_media_domains``; every
  redirect hop is checked again, at most 5 hops, all within ``media_fetch_timeout``,
  and the body is capped at ``max_audio_bytes`` while it streams.
- ``file://`` only below ``allowed_local_media_path``, after resolving symlinks and ``..``.

A refused URL is the caller's fault (400, code ``media_url_not_allowed``); a URL that
cannot be fetched gives 400 with code ``media_fetch_failed``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import pathlib
import socket
from urllib.parse import unquote, urljoin, urlsplit, urlunsplit

import httpx

from oai_audio_server.audio.payload import AudioBytes, decode_data_uri, too_large
from oai_audio_server.errors import InvalidRequestError
from oai_audio_server.settings import Settings

MAX_REDIRECTS = 5
NOT_ALLOWED = "media_url_not_allowed"
FETCH_FAILED = "media_fetch_failed"
_LOCAL_HOSTNAMES = ("localhost",)
_SUPPORTED = (
    "Audio URLs may be data: URIs, http(s):// URLs on hosts listed in "
    "allowed_media_domains, or file:// URLs under allowed_local_media_path."
)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


async def fetch_audio_url(url: str, settings: Settings) -> AudioBytes:
    """The bytes ``url`` names, or an error saying which setting would allow it."""
    scheme = url.partition(":")[0].strip().lower() if ":" in url else ""
    if scheme == "data":
        return decode_data_uri(url.strip(), settings.max_audio_bytes)
    if scheme in ("http", "https"):
        return await _fetch_http(url.strip(), settings)
    if scheme == "file":
        return await asyncio.to_thread(_read_local_file, url.strip(), settings)
    raise InvalidRequestError(
        f"Unsupported audio URL scheme {scheme + ':' if scheme else '(none)'}. " + _SUPPORTED,
        code=NOT_ALLOWED,
    )


# --- http(s) -------------------------------------------------------------------------


async def _fetch_http(url: str, settings: Settings) -> bytes:
    timeout = settings.media_fetch_timeout
    try:
        return await asyncio.wait_for(_follow_redirects(url, settings), timeout=timeout)
    except (asyncio.TimeoutError, httpx.TimeoutException) as error:
        raise InvalidRequestError(
            f"Fetching the audio URL took longer than {timeout:g} s (media_fetch_timeout).",
            code=FETCH_FAILED,
        ) from error
    except httpx.HTTPError as error:
        raise InvalidRequestError(
            f"The audio URL could not be fetched: {type(error).__name__}: {error}.",
            code=FETCH_FAILED,
        ) from error


async def _follow_redirects(url: str, settings: Settings) -> bytes:
    limits = httpx.Timeout(settings.media_fetch_timeout)
    async with httpx.AsyncClient(follow_redirects=False, timeout=limits, trust_env=False) as client:
        current = url
        for _hop in range(MAX_REDIRECTS + 1):
            address = await _check_http_url(current, settings)
            target, headers, extensions = _pinned_request(current, address)
            async with client.stream(
                "GET", target, headers=headers, extensions=extensions
            ) as response:
                if response.is_redirect:
                    location = response.headers.get("location")
                    if not location:
                        raise InvalidRequestError(
                            f"The audio URL answered {response.status_code} without a "
                            "Location header.",
                            code=FETCH_FAILED,
                        )
                    current = urljoin(current, location)
                    continue
                if not response.is_success:
                    raise InvalidRequestError(
                        f"The audio URL answered HTTP {response.status_code}.",
                        code=FETCH_FAILED,
                    )
                return await _read_capped(response, settings.max_audio_bytes)
    raise InvalidRequestError(
        f"The audio URL redirected more than {MAX_REDIRECTS} times.", code=FETCH_FAILED
    )


async def _read_capped(response: httpx.Response, max_bytes: int) -> bytes:
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise too_large(int(declared), max_bytes)
    body = bytearray()
    async for chunk in response.aiter_bytes():
        body += chunk
        if len(body) > max_bytes:
            raise too_large(None, max_bytes)
    return bytes(body)


def _normal_host(host: str) -> str:
    return host.strip().lower().rstrip(".").strip("[]")


def _pinned_request(url: str, address: IPAddress) -> tuple[str, dict[str, str], dict[str, str]]:
    """Connect to the address that was checked, not to a fresh DNS answer: otherwise a
    name could resolve to a public address for the check and an internal one for the
    connection (DNS rebinding). The Host header and TLS SNI/certificate check keep the
    original name."""
    parts = urlsplit(url)
    literal = f"[{address}]" if address.version == 6 else str(address)
    netloc = literal if parts.port is None else f"{literal}:{parts.port}"
    host_header = parts.netloc.rsplit("@", 1)[-1]
    extensions = {"sni_hostname": parts.hostname or ""} if parts.scheme == "https" else {}
    target = urlunsplit(parts._replace(netloc=netloc))
    return target, {"Accept": "*/*", "Host": host_header}, extensions


async def _check_http_url(url: str, settings: Settings) -> IPAddress:
    """Check the URL against the rules; return the address to connect to."""
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("http", "https"):
        raise InvalidRequestError(
            f"The audio URL redirected to a {parts.scheme or 'relative'}: URL; only "
            "http(s) redirects are followed.",
            code=NOT_ALLOWED,
        )
    host = _normal_host(parts.hostname or "")
    allowed = {_normal_host(entry) for entry in settings.allowed_media_domains}
    if not host or host not in allowed:
        raise InvalidRequestError(
            f"Fetching audio from host {host or '(none)'!r} is not allowed; list it in "
            "allowed_media_domains (--allowed-media-domains / OAS_ALLOWED_MEDIA_DOMAINS) "
            "or send the audio inline as base64.",
            code=NOT_ALLOWED,
        )
    try:
        port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
    except ValueError as error:
        raise InvalidRequestError("The audio URL has an invalid port.", code=NOT_ALLOWED) from error
    addresses = await _resolve(host, port)
    _check_addresses(host, addresses)
    return addresses[0]


async def _resolve(host: str, port: int) -> list[IPAddress]:
    literal = _ip_literal(host)
    if literal is not None:
        return [literal]
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as error:
        raise InvalidRequestError(
            f"The audio URL's host {host!r} could not be resolved.", code=FETCH_FAILED
        ) from error
    resolved: list[IPAddress] = []
    for _family, _type, _proto, _name, sockaddr in infos:
        address = _ip_literal(str(sockaddr[0]).split("%", 1)[0])
        if address is not None:
            resolved.append(address)
    return resolved


def _ip_literal(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def is_public_address(address: IPAddress) -> bool:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return not (
        address.is_private
        or address.is_loopback
        or address.is_link_local
        or address.is_multicast
        or address.is_reserved
        or address.is_unspecified
        or not address.is_global
    )


def _check_addresses(host: str, addresses: list[IPAddress]) -> None:
    """Refuse a listed DNS name that resolves to an internal address.

    An allow-list entry that is itself an IP address or ``localhost`` names an internal
    address on purpose, so it is trusted. A DNS name could be re-pointed (DNS
    rebinding) to reach internal services, so its addresses must all be public.
    """
    if _ip_literal(host) is not None or host in _LOCAL_HOSTNAMES or host.endswith(".localhost"):
        return
    if not addresses:
        raise InvalidRequestError(
            f"The audio URL's host {host!r} has no IP address.", code=FETCH_FAILED
        )
    internal = [str(address) for address in addresses if not is_public_address(address)]
    if internal:
        raise InvalidRequestError(
            f"The audio URL's host {host!r} resolves to a non-public address "
            f"({', '.join(internal)}); internal addresses are fetched only when "
            "allowed_media_domains lists the IP address itself (or localhost).",
            code=NOT_ALLOWED,
        )


# --- file:// ---------------------------------------------------------------------------


def _read_local_file(url: str, settings: Settings) -> bytes:
    if settings.allowed_local_media_path is None:
        raise InvalidRequestError(
            "file:// audio URLs are not allowed; set allowed_local_media_path "
            "(--allowed-local-media-path / OAS_ALLOWED_LOCAL_MEDIA_PATH) to a directory "
            "to allow them, or send the audio inline as base64.",
            code=NOT_ALLOWED,
        )
    parts = urlsplit(url)
    outside = InvalidRequestError(
        "The file:// audio URL is outside allowed_local_media_path; only files inside "
        "that directory may be read.",
        code=NOT_ALLOWED,
    )
    if parts.netloc.lower() not in ("", *_LOCAL_HOSTNAMES):
        raise outside
    raw_path = unquote(parts.path)
    if not raw_path.startswith("/") or "\x00" in raw_path:
        raise outside
    try:
        root = pathlib.Path(settings.allowed_local_media_path).resolve()
        # Resolve symlinks and ".." before checking containment; never reveal whether a
        # file outside the directory exists.
        target = pathlib.Path(raw_path).resolve()
    except (OSError, RuntimeError, ValueError) as error:
        raise outside from error
    if not target.is_relative_to(root):
        raise outside
    max_bytes = settings.max_audio_bytes
    try:
        if not target.is_file():
            raise InvalidRequestError(
                "The file:// audio URL names no regular file in allowed_local_media_path.",
                code=FETCH_FAILED,
            )
        size = target.stat().st_size
        if size > max_bytes:
            raise too_large(size, max_bytes)
        with target.open("rb") as handle:
            data = handle.read(max_bytes + 1)
    except OSError as error:
        raise InvalidRequestError(
            f"The file:// audio URL could not be read: {error.strerror or error}.",
            code=FETCH_FAILED,
        ) from error
    if len(data) > max_bytes:
        raise too_large(None, max_bytes)
    return data
