"""What a WebSocket edge answers in plain HTTP, before the upgrade: the same on every edge.

Every edge (``wsbus_websockets``, ``wsbus_picows``, one of yours) parses the request with
its own library and hands the parts to :class:`HttpFront`, which decides: a repeated
header, an absurd subprotocol offer, a shutting-down or full server and a foreign origin are
refused; a plain GET gets the health endpoint, a file of the static directory, or 426; an
upgrade that passes gets its :class:`~wsbus.hooks.HandshakeRequest` (the token found in the
header, subprotocol, query or cookie). The edge turns a :class:`Reply` into its library's
response. Nothing here touches a socket or imports a transport; only
:meth:`StaticFiles.reply` reads files, from the static directory and nowhere else.

Static paths are percent-decoded one segment at a time (a browser asks for
``/my%20page.html``); a segment that decodes to ``.`` or ``..``, or to anything with a
``/``, a backslash, a control character (NUL included) or invalid UTF-8, gets 404, as does a
path that resolves (symbolic links followed) outside the directory.
"""

from __future__ import annotations

import dataclasses
import http
import ipaddress
import logging
import mimetypes
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Final, Protocol
from urllib.parse import parse_qsl, unquote, urlsplit

import msgspec

from wsbus.errors import ConfigError
from wsbus.hooks import HandshakeRequest

if TYPE_CHECKING:
    from wsbus.gateway import Gateway
    from wsbus.metrics import GatewayMetrics
    from wsbus.ready import Readiness, ReadyReport

__all__ = [
    "PROXY_HEADERS",
    "RESPONSE_HEADERS",
    "SINGLE_HEADERS",
    "TOKEN_SUBPROTOCOL_PREFIX",
    "HeaderValues",
    "HttpFront",
    "HttpSettings",
    "Networks",
    "OpsConfig",
    "OpsSettings",
    "Reply",
    "StaticFiles",
    "check_http_settings",
    "cookie_value",
    "offered_subprotocols",
    "split_target",
    "static_parts",
]

log = logging.getLogger("wsbus.http")

TOKEN_SUBPROTOCOL_PREFIX: Final = "wsbus.token."
"""A subprotocol ``wsbus.token.<token>`` carries a bearer token from a browser, which
cannot set headers on a WebSocket. Offer it beside a codec subprotocol; it is never
selected."""

SINGLE_HEADERS: Final = ("Host", "Origin", "Upgrade", "Authorization", "Cookie")
"""Headers a request may not repeat: two parsers could read a repeated one two ways."""

RESPONSE_HEADERS: Final = (
    ("Cache-Control", "no-store"),
    ("X-Content-Type-Options", "nosniff"),
)
"""Headers of every plain-HTTP response, besides ``Content-Type`` (and the edge's own
``Content-Length`` and ``Connection: close``)."""

PROXY_HEADERS: Final = ("Forwarded", "X-Forwarded-For", "X-Real-IP", "Via")
"""Headers a proxy adds: a request with one is never taken for an operator's (its address
is the proxy's, loopback for a proxy on this host)."""

_LOOPBACK: Final = ("127.0.0.0/8", "::1/128")

MAX_STATIC_PATH: Final = 255
"""Characters of a static path, decoded, at most; a longer one is not found."""

_NOT_A_NAME: Final = frozenset("/\\") | frozenset(map(chr, range(0x20))) | {"\x7f"}
"""Characters a decoded path segment may not hold: separators and control characters."""

HeaderValues = Callable[[str], Sequence[str]]
"""Every value of one request header, by its name in any case (``Headers.get_all``)."""


class HttpSettings(Protocol):
    """The settings an edge's configuration gives :class:`HttpFront` (both edges' have them).

    Their meaning is the edge's (``wsbus_websockets.EdgeConfig``).
    """

    @property
    def allowed_origins(self) -> tuple[str, ...]: ...  # noqa: D102
    @property
    def allow_same_origin(self) -> bool: ...  # noqa: D102
    @property
    def allow_missing_origin(self) -> bool: ...  # noqa: D102
    @property
    def max_subprotocols(self) -> int: ...  # noqa: D102
    @property
    def max_subprotocol_bytes(self) -> int: ...  # noqa: D102
    @property
    def health_path(self) -> str: ...  # noqa: D102
    @property
    def static_dir(self) -> str | None: ...  # noqa: D102
    @property
    def token_query(self) -> str: ...  # noqa: D102
    @property
    def token_cookie(self) -> str: ...  # noqa: D102


class OpsSettings(HttpSettings, Protocol):
    """The readiness and metrics settings of an edge (both of wsbus's edges have them).

    :class:`HttpFront` reads them when the edge's settings have them, with these
    defaults otherwise: ``ready_path`` ``/readyz``, ``ready_timeout`` 2 s, no
    ``ready_services``, no ``metrics_path`` (metrics off), ``metrics_from`` loopback.
    """

    @property
    def ready_path(self) -> str: ...  # noqa: D102
    @property
    def ready_timeout(self) -> float: ...  # noqa: D102
    @property
    def ready_services(self) -> tuple[str, ...]: ...  # noqa: D102
    @property
    def metrics_path(self) -> str: ...  # noqa: D102
    @property
    def metrics_from(self) -> tuple[str, ...]: ...  # noqa: D102


class OpsConfig(msgspec.Struct, frozen=True, kw_only=True):
    """The readiness and metrics settings every edge's configuration has (it subclasses this).

    The paths are below the mount, for an edge mounted in an application (ASGI).

    Attributes:
        ready_path: the path of the readiness endpoint: a probe round the bus and back
            (docs/operations.md); empty turns it off.
        ready_timeout: seconds the readiness probe may take to come back round the bus
            before the gateway is reported not ready (at most a third of the edge's
            ``open_timeout`` is used).
        ready_services: services that must have a live instance on the bus for the
            gateway to be ready.
        metrics_path: the path of the Prometheus metrics (``/metrics``); empty (the
            default) turns them off. Needs ``pip install 'wsbus[metrics]'``.
        metrics_from: the networks that may read the metrics and the details of
            ``/readyz`` (CIDR, or one address); loopback only by default. Others, and any
            request through a proxy, get 403 (and no details).
    """

    ready_path: str = "/readyz"
    ready_timeout: float = 2.0
    ready_services: tuple[str, ...] = ()
    metrics_path: str = ""
    metrics_from: tuple[str, ...] = ("127.0.0.0/8", "::1/128")


@dataclasses.dataclass(frozen=True, slots=True)
class Reply:
    """A plain-HTTP response, for the edge to write in its library's form.

    Attributes:
        status: the status code.
        body: the body, whole.
        content_type: its ``Content-Type``.
    """

    status: http.HTTPStatus
    body: bytes
    content_type: str

    @classmethod
    def text(cls, status: http.HTTPStatus, text: str) -> Reply:
        """A ``text/plain`` reply: what the client did, or what to do."""
        return cls(status, text.encode(), "text/plain; charset=utf-8")


class Networks:
    """Which client addresses may read ``/metrics``: a list of networks.

    Args:
        networks: CIDR networks (``127.0.0.0/8``, ``10.0.0.0/8``, ``::1/128``); an address
            without a prefix is one host.

    Raises:
        ConfigError: one of them is not a network (the setting is named).
    """

    def __init__(self, networks: Sequence[str], setting: str = "metrics_from") -> None:
        parsed: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        for text in networks:
            try:
                parsed.append(ipaddress.ip_network(text, strict=False))
            except ValueError:
                raise ConfigError(
                    f"{setting}: {text!r} is not a network; write one like 127.0.0.0/8 or 10.1.2.3"
                ) from None
        self.networks = tuple(parsed)

    def allows(self, peer: str) -> bool:
        """Whether the client at ``peer`` (``host:port``, ``[v6]:port`` or a bare host) may."""
        if peer.startswith("["):
            candidates = [peer[1:].partition("]")[0]]
        else:
            # The edges give host:port, the port after the last colon (an IPv6 host has
            # colons of its own, so the whole text is tried only when that fails).
            candidates = [peer.rpartition(":")[0], peer]
        for host in candidates:
            try:
                address = ipaddress.ip_address(host)
                break
            except ValueError:
                continue
        else:
            return False
        addresses: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = [address]
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            # A dual-stack socket's IPv4 client: its IPv4 address counts (and the mapped
            # form, for a network written that way).
            addresses.append(address.ipv4_mapped)
        return any(a in network for a in addresses for network in self.networks)


class StaticFiles:
    """The files of one directory, for plain HTTP GET. Never anything outside it.

    Args:
        root: the directory; resolved once, here.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()

    def reply(self, path: str) -> Reply:
        """The file ``path`` (as the request line has it, percent-encoded) names, or 404."""
        not_found = Reply.text(http.HTTPStatus.NOT_FOUND, "not found\n")
        parts = static_parts(path)
        if parts is None:
            return not_found
        try:
            target = self.root.joinpath(*parts).resolve()
            if target.is_dir():
                # Resolved again: the directory's index.html may be a link too.
                target = (target / "index.html").resolve()
            # Never serve anything outside the directory, whatever the path or a link says.
            if not target.is_relative_to(self.root) or not target.is_file():
                return not_found
            body = target.read_bytes()
        except (OSError, ValueError):
            # A name too long, a file that vanished or may not be read: simply not found.
            return not_found
        content_type = mimetypes.guess_type(target.name)[0] or "application/octet-stream"
        if content_type.startswith("text/") or content_type.endswith("javascript"):
            content_type += "; charset=utf-8"
        return Reply(http.HTTPStatus.OK, body, content_type)


def check_http_settings(settings: OpsSettings) -> None:
    """Check the health, readiness and metrics settings of an edge's configuration.

    Raises:
        ConfigError: one is wrong; the message names it.
    """
    paths = {"health_path": settings.health_path}
    if settings.ready_path:
        paths["ready_path"] = settings.ready_path
    if settings.metrics_path:
        paths["metrics_path"] = settings.metrics_path
    for name, path in paths.items():
        if not path.startswith("/") or not set("?#").isdisjoint(path):
            raise ConfigError(f"{name} {path!r} must be a path: starting with /, no ? or #")
    if len(set(paths.values())) != len(paths):
        given = ", ".join(f"{name} = {path!r}" for name, path in paths.items())
        raise ConfigError(f"health_path, ready_path and metrics_path must differ ({given})")
    if not settings.ready_timeout > 0:
        raise ConfigError("ready_timeout must be > 0 seconds")
    Networks(settings.metrics_from)


def static_parts(path: str) -> list[str] | None:
    """The names a static ``path`` (percent-encoded, no query) asks for; None: refuse it.

    ``/`` is ``["index.html"]``. Empty segments (``//``) are skipped. A segment must decode
    (UTF-8, strictly) to a plain name: not ``.`` or ``..``, with no ``/``, backslash or
    control character; the raw path must be ASCII (a client percent-encodes the rest).
    """
    if not path.isascii():
        return None
    parts: list[str] = []
    size = 0
    for segment in path.split("/"):
        if not segment:
            continue
        try:
            name = unquote(segment, errors="strict")
        except UnicodeDecodeError:
            return None
        if name in (".", "..") or not _NOT_A_NAME.isdisjoint(name):
            return None
        size += len(name) + 1
        if size > MAX_STATIC_PATH:
            return None
        parts.append(name)
    return parts or ["index.html"]


def split_target(target: str) -> tuple[str, str]:
    """A request line's target as its path (percent-encoded) and its query.

    ``//a/b`` is the path ``//a/b`` (``urlsplit`` would read ``a`` as a host); an
    absolute-form target (``http://host/path``, RFC 9112 section 3.2.2) gives its path.
    """
    if not target.startswith("/"):
        url = urlsplit(target)
        return url.path or "/", url.query
    path, _, query = target.partition("?")
    return path.partition("#")[0], query


def cookie_value(header: str, name: str) -> str | None:
    """Return the value of the first cookie called ``name`` in a ``Cookie`` header.

    RFC 6265 section 5.4: ``name=value`` pairs separated by ``;``. One pass over the
    header, whatever it holds (``http.cookies`` is quadratic on some inputs,
    CVE-2024-7592). A value in double quotes loses them; nothing else is unescaped.
    Pairs without ``=`` are skipped, as browsers do.
    """
    for pair in header.split(";"):
        key, sep, value = pair.partition("=")
        if sep and key.strip() == name:
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] == '"':
                value = value[1:-1]
            return value
    return None


def offered_subprotocols(values: Iterable[str]) -> list[str]:
    """The subprotocol names in the ``Sec-WebSocket-Protocol`` header values, in order."""
    offered: list[str] = []
    for value in values:
        offered.extend(p.strip() for p in value.split(",") if p.strip())
    return offered


class HttpFront:
    """An edge's answers before the upgrade, and what the gateway learns of an upgrade.

    Make one per edge, and tell it where the edge listens with :meth:`listening` before
    the first request (same-origin checks need the scheme and the port).

    Args:
        settings: the edge's configuration.
    """

    def __init__(self, settings: HttpSettings) -> None:
        self.settings = settings
        self.static = StaticFiles(settings.static_dir) if settings.static_dir else None
        # Read once, with their defaults: an edge's settings written before these existed
        # (HttpSettings grew them) keep working, with readiness on and metrics off.
        self.ready_path: str = getattr(settings, "ready_path", "/readyz")
        self.metrics_path: str = getattr(settings, "metrics_path", "")
        self.readiness: Readiness | None = None
        """The gateway's readiness (``/readyz``), once :meth:`attach` was called."""
        self.metrics: GatewayMetrics | None = None
        """The gateway's metrics (``/metrics``), when ``metrics_path`` is set."""
        self._metrics_from = Networks(getattr(settings, "metrics_from", _LOOPBACK))
        self._refusals_logged = -1.0e9
        self._scheme = "http"
        # None: not on loopback, any Host counts; else only these loopback names do.
        self._loopback_hosts: frozenset[str] | None = frozenset()

    def attach(self, gateway: Gateway, edge: str) -> None:
        """Serve ``gateway``'s readiness, and its metrics when ``metrics_path`` is set.

        Args:
            gateway: the gateway behind the edge.
            edge: the edge's name (a label of the metrics).

        Raises:
            MissingExtra: ``metrics_path`` is set and ``prometheus_client`` is not installed.
            ConfigError: ``metrics_from`` holds something that is not a network.
        """
        from wsbus.ready import Readiness

        settings = self.settings
        if self.metrics_path:
            from wsbus.metrics import GatewayMetrics

            self.metrics = GatewayMetrics(gateway, edge)
        timeout = getattr(settings, "ready_timeout", 2.0)
        open_timeout = getattr(settings, "open_timeout", None)
        if isinstance(open_timeout, int | float) and 3 * timeout > open_timeout:
            # /readyz waits for the probe, then for the list of services, within the time
            # the edge gives a request (open_timeout): it must answer before that ends.
            timeout = open_timeout / 3
        self.readiness = Readiness(
            gateway,
            timeout=timeout,
            services=getattr(settings, "ready_services", ()),
            observe=None if self.metrics is None else self.metrics.observe,
        )

    def wants_ready(self, target: str) -> bool:
        """Whether a plain GET of ``target`` asks for ``/readyz``.

        An edge that can wait answers it with :meth:`ready`; one that cannot, through
        :meth:`get` (the latest check).
        """
        ready_path = self.ready_path
        return (
            bool(ready_path)
            and self.readiness is not None
            and (split_target(target)[0] == ready_path)
        )

    async def ready(
        self, *, closing: bool, peer: str = "", headers: HeaderValues | None = None
    ) -> Reply:
        """Probe the bus (or reuse a check a moment old) and answer ``/readyz``.

        The whole report goes to an operator (``metrics_from``, not through a proxy);
        anyone else gets each part's status without what names the deployment.
        """
        assert self.readiness is not None
        report = await self.readiness.check(closing)
        return _ready_reply(report, full=self._operator(peer, headers))

    def _operator(self, peer: str, headers: HeaderValues | None) -> bool:
        """Whether the client at ``peer`` may read metrics and readiness details.

        Its own address must be in ``metrics_from``, and the request must not have come
        through a proxy: behind a proxy on this host every client's address is loopback.
        """
        if headers is not None and any(headers(name) for name in PROXY_HEADERS):
            return False
        return self._metrics_from.allows(peer)

    async def close(self) -> None:
        """Stop the readiness probes (the edge calls this as it closes)."""
        if self.readiness is not None:
            await self.readiness.close()

    def listening(self, port: int, *, secure: bool, loopback: bool) -> None:
        """Say where the edge listens: ``port``, with TLS or not, on loopback only or not."""
        self._scheme = "https" if secure else "http"
        self._loopback_hosts = (
            frozenset({f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}"})
            if loopback
            else None
        )

    def repeated(self, values: HeaderValues) -> Reply | None:
        """400 for a request that repeats one of :data:`SINGLE_HEADERS`, else None."""
        for name in SINGLE_HEADERS:
            if len(values(name)) > 1:
                return Reply.text(http.HTTPStatus.BAD_REQUEST, f"repeated {name} header\n")
        return None

    def get(
        self,
        target: str,
        *,
        closing: bool,
        connections: int,
        peer: str = "",
        headers: HeaderValues | None = None,
    ) -> Reply:
        """The answer to a plain GET of ``target``: health, readiness, metrics, a file, or 426.

        Args:
            target: the request line's target (path and query), percent-encoded.
            closing: the edge or its gateway is shutting down (health says 503 ``closing``:
                a load balancer stops sending new clients here).
            connections: the gateway's open connections, for the health endpoint.
            peer: the client's address (``host:port``): ``/metrics`` (and the details of
                ``/readyz``) are only for ``metrics_from``.
            headers: the request's headers: a request through a proxy is never an
                operator's.
        """
        path = split_target(target)[0]
        settings = self.settings
        if path == settings.health_path:
            status = "closing" if closing else "ok"
            body = msgspec.json.encode({"status": status, "connections": connections})
            code = http.HTTPStatus.SERVICE_UNAVAILABLE if closing else http.HTTPStatus.OK
            return Reply(code, body, "application/json")
        if self.ready_path and path == self.ready_path and self.readiness is not None:
            # An edge that cannot wait: the latest check, kept fresh in the background.
            report = self.readiness.current(closing)
            return _ready_reply(report, full=self._operator(peer, headers))
        if self.metrics_path and path == self.metrics_path and self.metrics is not None:
            return self._metrics(peer, closing, headers)
        if self.static is not None:
            return self.static.reply(path)
        return Reply.text(http.HTTPStatus.UPGRADE_REQUIRED, "this is a WebSocket endpoint\n")

    def _metrics(self, peer: str, closing: bool, headers: HeaderValues | None) -> Reply:
        assert self.metrics is not None
        if not self._operator(peer, headers):
            now = time.monotonic()
            if now - self._refusals_logged >= 60.0:
                # Once a minute at most: anyone may ask, as often as they like.
                self._refusals_logged = now
                log.info(
                    "refused /metrics to %s: not in metrics_from, or through a proxy "
                    "(said once a minute)",
                    peer,
                )
            return Reply.text(
                http.HTTPStatus.FORBIDDEN,
                "metrics are not served to this address, nor through a proxy (the "
                "gateway's metrics_from setting lists who may read them)\n",
            )
        if self.readiness is not None:
            # Keeps the probes going while someone scrapes: they feed the latency histograms.
            self.readiness.current(closing)
        from wsbus.metrics import CONTENT_TYPE

        return Reply(http.HTTPStatus.OK, self.metrics.render(), CONTENT_TYPE)

    def upgrade_refusal(
        self, values: HeaderValues, *, closing: bool, full: bool, peer: str
    ) -> Reply | None:
        """Why an upgrade request is refused (400, 503, 403), or None to go on.

        In this order: an absurd subprotocol offer, a shutting-down server, a full one, a
        foreign origin (logged, with ``peer``). Only-unknown subprotocols are the edge's to
        refuse (400), when it negotiates the codec.
        """
        refusal = self.subprotocol_refusal(values("Sec-WebSocket-Protocol"))
        if refusal is not None:
            return Reply.text(http.HTTPStatus.BAD_REQUEST, refusal)
        if closing:
            return Reply.text(http.HTTPStatus.SERVICE_UNAVAILABLE, "server shutting down\n")
        if full:
            return Reply.text(http.HTTPStatus.SERVICE_UNAVAILABLE, "server is full; retry later\n")
        hosts = values("Host")
        if not self.origin_allowed(values("Origin"), hosts[0] if hosts else None):
            origins = values("Origin")
            log.info(
                "refused a WebSocket from %s: origin %r is not allowed",
                peer,
                origins[0] if origins else None,
            )
            return Reply.text(http.HTTPStatus.FORBIDDEN, "origin not allowed\n")
        return None

    def subprotocol_refusal(self, values: Sequence[str]) -> str | None:
        """Why the ``Sec-WebSocket-Protocol`` values are refused (too long, too many), or None.

        Counted in one pass over the bytes, before any per-name work: parsing a huge offer
        name by name costs more than the offer.
        """
        if not values:
            return None
        settings = self.settings
        size = sum(len(value) for value in values)
        if size > settings.max_subprotocol_bytes:
            return (
                f"Sec-WebSocket-Protocol headers too long: {size} bytes, at most "
                f"{settings.max_subprotocol_bytes}\n"
            )
        names = sum(value.count(",") + 1 for value in values)
        if names > settings.max_subprotocols:
            return (
                f"too many subprotocols offered: {names}, at most {settings.max_subprotocols}; "
                "offer wsbus.v1.json or wsbus.v1.msgpack\n"
            )
        return None

    def origin_allowed(self, origins: Sequence[str], host: str | None) -> bool:
        """Whether a page at ``origins`` (the Origin header's values) may connect."""
        settings = self.settings
        if not origins:
            return settings.allow_missing_origin
        if len(origins) > 1:
            return False
        origin = origins[0]
        if origin in settings.allowed_origins:
            return True
        if origin == "null" or origin.startswith("file:"):
            # Sandboxed frames, file:// pages and some privacy modes send these: anyone can.
            return False
        if not settings.allow_same_origin:
            return False
        parts = urlsplit(origin)
        if host is None or parts.scheme != self._scheme or parts.netloc != host:
            return False
        # On a loopback address only loopback names count as "this server": a page on
        # another site that re-points its DNS name at 127.0.0.1 is not same-origin.
        loopback = self._loopback_hosts
        return loopback is None or host in loopback

    def handshake_request(
        self, target: str, headers: Iterable[tuple[str, str]], peer: str
    ) -> HandshakeRequest:
        """What the gateway's authentication hooks see of an upgrade.

        Args:
            target: the request line's target (path and query).
            headers: the request's headers, as sent, in order.
            peer: the client's address, ``host:port``.

        The path is percent-decoded (as the query's values are); the token is the first of
        ``Authorization: Bearer``, a ``wsbus.token.`` subprotocol, the query parameter
        ``token_query``, the cookie ``token_cookie``.
        """
        path, query_string = split_target(target)
        pairs = list(headers)
        lowered = {name.lower(): value for name, value in pairs}
        offered = offered_subprotocols(
            value for name, value in pairs if name.lower() == "sec-websocket-protocol"
        )
        query = dict(parse_qsl(query_string))
        return HandshakeRequest(
            path=unquote(path),
            query=query,
            headers=lowered,
            remote=peer,
            subprotocols=tuple(offered),
            token=self.token(lowered, offered, query),
        )

    def token(
        self, headers: Mapping[str, str], offered: Sequence[str], query: Mapping[str, str]
    ) -> str | None:
        """The bearer token an upgrade carries, or None (``headers`` lower-cased)."""
        scheme, _, credentials = headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and credentials.strip():
            return credentials.strip()
        for protocol in offered:
            if protocol.startswith(TOKEN_SUBPROTOCOL_PREFIX):
                return protocol[len(TOKEN_SUBPROTOCOL_PREFIX) :]
        if self.settings.token_query in query:
            return query[self.settings.token_query]
        cookie = headers.get("cookie")
        if cookie:
            return cookie_value(cookie, self.settings.token_cookie)
        return None


def _ready_reply(report: ReadyReport, *, full: bool) -> Reply:
    status, body = report.http(full=full)
    return Reply(status, body, "application/json")
