"""NATS settings for wsbus, and how they become nats-py's connection options.

Every wsbus process on NATS (gateway, service instance) takes a :class:`NatsConfig`. nats-py's
defaults are changed where they would lose messages silently:

- reconnect for ever (nats-py gives up after 60 attempts, about two minutes), with an
  exponential backoff and jitter from ``reconnect_wait`` to ``reconnect_wait_max``;
- no publish buffer while disconnected (nats-py keeps up to 2 MiB and sends it after a
  reconnect, or never): a publish then fails at once and wsbus refuses the message;
- explicit pending limits (messages and bytes) on every subscription wsbus makes.
"""

from __future__ import annotations

import random
import ssl
import urllib.parse
from typing import Any

import msgspec

from wsbus.errors import ConfigError

from .subjects import is_token

__all__ = ["NatsConfig", "has_credentials", "redact_url"]


def redact_url(url: str) -> str:
    """Return ``url`` fit to show (logs, errors): a password or token in it hidden.

    ``nats://user:secret@host:4222`` -> ``nats://user:***@host:4222``, and a token
    (``nats://secret@host``) -> ``nats://***@host``. Every URL wsbus shows goes through it.
    """
    head, sep, rest = url.partition("://")
    if not sep:
        head, rest = "", url
    userinfo, at, hostpart = rest.rpartition("@")
    if not at:
        return url
    user, colon, _ = userinfo.partition(":")
    shown = f"{user}:***" if colon else "***"
    return f"{head}{sep}{shown}@{hostpart}"


def has_credentials(url: str) -> bool:
    """Return True when ``url`` holds a user, password or token (``user:pass@``)."""
    return "@" in urllib.parse.urlsplit(url if "://" in url else f"nats://{url}").netloc


class NatsConfig(msgspec.Struct, frozen=True, kw_only=True):
    """Settings of the NATS bus, shared by gateways and service instances.

    Attributes:
        servers: NATS server URLs (``nats://host:port``, ``tls://host:port``); a client
            connects to one and fails over to the others (and to those the cluster
            announces).
        user: user name, with ``password``.
        password: password, with ``user``.
        token: an authentication token (instead of user and password).
        creds_file: a ``.creds`` file (JWT and nkey seed), for decentralized auth.
        nkey_seed_file: a file holding an nkey seed, for nkey auth.
        tls_ca: a CA bundle to check the server's certificate with; setting any TLS
            option turns TLS on.
        tls_cert: this client's certificate, for servers that ask for one.
        tls_key: the private key of ``tls_cert``.
        prefix: the first token of every wsbus subject (and of the key-value buckets'
            names), so that several deployments can share one NATS.
        heartbeat: seconds between the directory heartbeats of each gateway and service
            instance. An entry not refreshed within three heartbeats is dead: a dead
            gateway's aliases and a dead instance's types free after about that long.
        kv_replicas: replicas of the key-value buckets (1, 3 or 5 on a cluster).
        request_timeout: seconds a publish waits for a service instance to confirm it
            holds the envelope, and seconds a key-value operation may take.
        connect_timeout: seconds one connection attempt may take.
        pending_msgs: the most NATS messages each subscription may hold unread (one
            to a gateway may carry a batch of envelopes); past that, nats-py drops (a
            slow consumer, counted and reported).
        pending_bytes: the most bytes each subscription may hold unread (at least
            4 MiB: one NATS message may carry up to the server's max_payload).
        reconnect_wait: seconds before the first reconnection attempt.
        reconnect_wait_max: the longest wait between reconnection attempts.
        outbound_size: envelopes a service instance may have waiting to go to NATS
            before its sends are refused (BusUnavailable).
        name: the connection name shown in NATS monitoring; wsbus picks one if None.
    """

    servers: tuple[str, ...] = ("nats://127.0.0.1:4222",)
    user: str | None = None
    password: str | None = None
    token: str | None = None
    creds_file: str | None = None
    nkey_seed_file: str | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    prefix: str = "wsbus"
    heartbeat: float = 1.0
    kv_replicas: int = 1
    request_timeout: float = 5.0
    connect_timeout: float = 2.0
    pending_msgs: int = 65536
    pending_bytes: int = 64 * 1024 * 1024
    reconnect_wait: float = 0.1
    reconnect_wait_max: float = 2.0
    outbound_size: int = 10000
    name: str | None = None

    def __post_init__(self) -> None:
        if not self.servers:
            raise ConfigError("servers: give at least one NATS server URL")
        if not is_token(self.prefix):
            raise ConfigError(
                f"prefix {self.prefix!r} must be one NATS subject token (letters, digits, "
                "'-' or '_'; no '.', '*', '>' or spaces)"
            )
        if self.heartbeat <= 0 or self.request_timeout <= 0 or self.connect_timeout <= 0:
            raise ConfigError("heartbeat, request_timeout and connect_timeout must be > 0")
        if self.kv_replicas not in (1, 2, 3, 4, 5):
            raise ConfigError("kv_replicas must be between 1 and 5")
        if self.pending_msgs < 1 or self.pending_bytes < 4 * 1024 * 1024:
            raise ConfigError(
                "pending_msgs must be >= 1 and pending_bytes >= 4 MiB (one NATS message "
                "may carry up to the server's max_payload, 1 MiB by default)"
            )
        if not 0 < self.reconnect_wait <= self.reconnect_wait_max:
            raise ConfigError("reconnect_wait must be > 0 and at most reconnect_wait_max")
        if self.outbound_size < 1:
            raise ConfigError("outbound_size must be >= 1")
        if (self.user is None) != (self.password is None):
            raise ConfigError("user and password go together: give both or neither")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("tls_cert and tls_key go together: give both or neither")

    @property
    def authenticates(self) -> bool:
        """True when this process logs in to NATS (a user, token, creds or nkey, or a URL's)."""
        given = (self.user, self.token, self.creds_file, self.nkey_seed_file)
        return any(v is not None for v in given) or any(map(has_credentials, self.servers))

    def scrub(self, text: str) -> str:
        """Return ``text`` (an error's, say) with this configuration's secrets hidden.

        The password, the token and any password or token in a server URL become ``***``.
        """
        secrets = {self.password, self.token}
        for url in self.servers:
            parts = urllib.parse.urlsplit(url if "://" in url else f"nats://{url}")
            secrets.update((parts.password, parts.username if parts.password is None else None))
        for secret in sorted(filter(None, secrets), key=len, reverse=True):
            text = text.replace(secret, "***")
        return text

    @property
    def uses_tls(self) -> bool:
        """True when a TLS option is set (or a server URL says ``tls://``)."""
        return any(v is not None for v in (self.tls_ca, self.tls_cert, self.tls_key)) or any(
            url.startswith("tls://") for url in self.servers
        )

    def backoff(self, attempts: int) -> float:
        """Seconds to wait before reconnection attempt ``attempts`` (0 first), with jitter.

        Doubles from ``reconnect_wait`` up to ``reconnect_wait_max``; the jitter (up to a
        half of it either way) keeps many clients from reconnecting in step.
        """
        wait = min(self.reconnect_wait_max, self.reconnect_wait * 2 ** min(attempts, 30))
        return float(wait * random.uniform(0.5, 1.5))

    def connect_options(self) -> dict[str, Any]:
        """Return the keyword arguments for ``nats.connect`` (callbacks excepted).

        ``max_reconnect_attempts`` is finite here, so that the first connection fails
        when no server answers; the bus sets it to -1 (for ever) once connected.
        """
        options: dict[str, Any] = {
            "servers": list(self.servers),
            "connect_timeout": self.connect_timeout,
            "reconnect_time_wait": self.reconnect_wait,
            "max_reconnect_attempts": 2,
            "allow_reconnect": True,
            # No silent buffer: a publish while disconnected raises at once.
            "pending_size": 0,
            "ping_interval": 5,
            "max_outstanding_pings": 2,
        }
        if self.user is not None:
            options["user"] = self.user
            options["password"] = self.password
        if self.token is not None:
            options["token"] = self.token
        if self.creds_file is not None:
            options["user_credentials"] = self.creds_file
        if self.nkey_seed_file is not None:
            options["nkeys_seed"] = self.nkey_seed_file
        if self.uses_tls:
            options["tls"] = self.ssl_context()
        return options

    def ssl_context(self) -> ssl.SSLContext:
        """Return the TLS context for the connection (server certificate checked).

        Raises:
            ConfigError: a certificate or key file cannot be read.
        """
        try:
            context = ssl.create_default_context(cafile=self.tls_ca)
            if self.tls_cert is not None:
                context.load_cert_chain(self.tls_cert, self.tls_key)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"the TLS files cannot be used: {exc}") from None
        return context
