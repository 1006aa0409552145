"""``wsbus nats-config``: the NATS users and permissions of a wsbus deployment.

Wrapping holds across NATS because every subject names its sender (see
:mod:`wsbus_nats.subjects`) and each process's NATS user may publish only under its own
name: service ``S`` publishes ``P.gw.*.svc.S`` and ``P.svc.*.svc.S``, gateway ``N``
publishes ``P.svc.*.gw.N`` (and the answers to services' control requests, ``P.reply.>``).
A service holding another service's credentials is another service as far as NATS knows;
a service holding its own cannot send as anyone else: the server refuses the publish.

Per user, on subjects under the prefix ``P`` (``wsbus``):

==================  ==========================================  ==============================
user                publishes                                   subscribes
==================  ==========================================  ==============================
``svc-S``           ``P.gw.*.svc.S``, ``P.svc.*.svc.S``,        ``P.svc.S.>``, ``P.reply.S.>``,
                    ``P.hist.*.S`` (its history entries),       ``_INBOX.P.svc.S.>``;
                    answers to requests it received             ``P.ev.>`` if it declared
                                                                ``wsbus.presence``
``gw-N``            ``P.svc.*.gw.N``, ``P.reply.>``,            ``P.gw.N.>``, ``P.ev.>``,
                    ``P.ev.gw.N`` (presence events), answers    ``_INBOX.P.gw.N.>``
``gateways``        as ``gw-N`` for every node ``*``            ``P.gw.*.>``, ``P.ev.>``,
                                                                ``_INBOX.P.gw.*.>``
==================  ==========================================  ==============================

and the directory in JetStream key-value buckets: everyone may open the three buckets,
read them and follow them (consumers on ``KV_P_gateways`` and ``KV_P_services``, their
deliveries on the process's own inbox and flow control on ``$JS.FC``); only gateways may
create them (whoever creates a bucket's stream chooses what it stores: see
:mod:`wsbus_nats.buckets`); service ``S`` writes only its own instances' keys
(``$KV.P_services.S.*``: exactly ``S.<instance>``), gateway ``N`` only its own liveness key
(``$KV.P_gateways.N``) and the alias table (``$KV.P_aliases.>``: any gateway may rewrite any
alias; each checks its own claims). Group history (the stream ``P_history``): gateways make
it and read it (direct gets, ordered consumers); a service reads its settings and a group's
last entry (by subject only) and appends only under its own name. Closed sessions
(``KV_P_sessions``): gateways only. The account's JetStream use is bounded
(:class:`JetStreamLimits`).

Each process gets every answer (acknowledgements, JetStream's replies and deliveries) on an
inbox of its own, ``_INBOX.P.<gw|svc>.<name>`` (:meth:`~wsbus_nats.subjects.Subjects.inbox`),
which only its user may subscribe to: no process reads another's session records, history
reads or key-value reads. (Gateways sharing the ``gateways`` user share its inboxes.)

The server configuration holds the passwords in clear: keep it readable by the server's
user only (written 0600 here), or replace each with its bcrypt hash (``nats server
passwd``).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Literal

from wsbus.errors import ConfigError

from .subjects import Subjects, check_tokens, is_token

__all__ = [
    "ANY_GATEWAY",
    "DEFAULT_ACCOUNT",
    "SERVER_CONFIG",
    "Access",
    "JetStreamLimits",
    "NatsUser",
    "Permissions",
    "gateway_permissions",
    "plan",
    "service_permissions",
    "write",
]

ANY_GATEWAY: Final = "*"
"""The node of the ``gateways`` user, which any gateway may use (random node ids)."""
DEFAULT_ACCOUNT: Final = "WSBUS"
"""The NATS account the users are put in (JetStream enabled)."""
SERVER_CONFIG: Final = "nats-server.conf"
"""The file name :func:`write` gives the server configuration."""
_HEADER: Final = """\
# nats-server configuration for wsbus, written by `wsbus nats-config`.
# It holds passwords: keep it readable by the server's user only (or replace each
# password with its bcrypt hash: `nats server passwd`). Start the server with
#   nats-server -c {file} -js
# (add your listen address, TLS and cluster settings; see docs/nats.md).
"""


@dataclass(frozen=True)
class Permissions:
    """What a NATS user may publish and subscribe to (everything else is refused).

    Attributes:
        publish: subjects it may publish to (NATS wildcards allowed).
        subscribe: subjects it may subscribe to.
        allow_responses: it may answer the requests it receives (once each), whatever
            their reply subject.
    """

    publish: tuple[str, ...]
    subscribe: tuple[str, ...]
    allow_responses: bool = True


@dataclass(frozen=True)
class NatsUser:
    """One user of the generated configuration.

    Attributes:
        name: the user name (``svc-echo``, ``gw-node1``, ``gateways``).
        password: its password (random, 32 URL-safe characters).
        role: what it is for.
        owner: the service's name, or the gateway's node (``*``: any).
        permissions: what it may do.
    """

    name: str
    password: str = field(repr=False)
    role: Literal["service", "gateway"]
    owner: str
    permissions: Permissions


@dataclass(frozen=True)
class JetStreamLimits:
    """The account's JetStream limits in the server configuration.

    Every user may create consumers (the directory's watches) and the gateways create the
    buckets' streams; without limits one user could fill the server's memory or disk.

    Attributes:
        max_memory: bytes of memory storage (ordered consumers' state).
        max_file: bytes of file storage (the directory's three buckets take 136 MiB per
            replica, the sessions bucket and the history stream 256 MiB each: 648 MiB per
            replica, at most 3,240 MiB with ``kv_replicas = 5``).
        max_streams: streams (the three directory buckets, the sessions bucket and the
            history stream).
        max_consumers: consumers per stream (two watches per process, more while one is
            made anew: about four per gateway or service instance; a gateway's history
            read is one while it lasts).
    """

    max_memory: int = 256 * 1024 * 1024
    max_file: int = 4 * 1024 * 1024 * 1024
    max_streams: int = 5
    max_consumers: int = 4096


@dataclass(frozen=True)
class Access:
    """The users of one deployment: what ``wsbus nats-config`` generates.

    Attributes:
        prefix: the subjects' prefix (``NatsConfig.prefix``).
        account: the NATS account holding the users.
        users: the users, services first.
        servers: server URLs to put in the credentials files (may be empty).
        jetstream: the account's JetStream limits.
    """

    prefix: str
    account: str
    users: tuple[NatsUser, ...]
    servers: tuple[str, ...] = ()
    jetstream: JetStreamLimits = field(default_factory=lambda: JetStreamLimits())

    def user(self, name: str) -> NatsUser:
        """Return the user called ``name``.

        Raises:
            KeyError: there is none.
        """
        for user in self.users:
            if user.name == name:
                return user
        raise KeyError(name)

    def service_user(self, service: str) -> NatsUser:
        """Return the user of service ``service``.

        Raises:
            KeyError: there is none.
        """
        return self.user(f"svc-{service}")

    def gateway_user(self, node: str = ANY_GATEWAY) -> NatsUser:
        """Return the user of gateway ``node`` (by default the any-gateway user).

        Raises:
            KeyError: there is none.
        """
        return self.user("gateways" if node == ANY_GATEWAY else f"gw-{node}")

    def server_config(self, file_name: str = SERVER_CONFIG) -> str:
        """Return the nats-server configuration: the account, its users and permissions."""
        lines = [_HEADER.format(file=file_name), "jetstream: enabled", "", "accounts {"]
        limits = self.jetstream
        lines += [
            f"  {_quote(self.account)} {{",
            # Bounds on what any user of the account can make JetStream hold (watches are
            # consumers; the buckets are the streams): see JetStreamLimits.
            "    jetstream: {",
            f"      max_memory: {limits.max_memory}",
            f"      max_file: {limits.max_file}",
            f"      max_streams: {limits.max_streams}",
            f"      max_consumers: {limits.max_consumers}",
            "    }",
            "    users: [",
        ]
        for user in self.users:
            what = (
                f"service {user.owner}"
                if user.role == "service"
                else "gateway " + ("(any node)" if user.owner == ANY_GATEWAY else user.owner)
            )
            lines += [
                f"      # {what}",
                "      {",
                f"        user: {_quote(user.name)}",
                f"        password: {_quote(user.password)}",
                "        permissions: {",
                "          publish: { allow: [",
                *_items(user.permissions.publish, "            "),
                "          ] }",
                "          subscribe: { allow: [",
                *_items(user.permissions.subscribe, "            "),
                "          ] }",
                f"          allow_responses: {str(user.permissions.allow_responses).lower()}",
                "        }",
                "      }",
            ]
        lines += ["    ]", "  }", "}", ""]
        return "\n".join(lines)

    def credentials(self, user: NatsUser) -> str:
        """Return a settings file (TOML) for ``user``'s process, for ``--config``.

        It chooses the NATS bus (``[serve] bus``), pins a named gateway's node id
        (``[gateway] node``: its permissions are for that node only) and holds the
        ``[nats]`` credentials: ``wsbus service MODULE:CLASS --config FILE`` or ``wsbus serve
        --config FILE`` needs nothing else. It holds the password: keep it readable by that
        process's user only.
        """
        if user.role == "service":
            what = f"service {user.owner!r}: wsbus service MODULE:CLASS --config FILE"
        elif user.owner == ANY_GATEWAY:
            what = "gateways of any node id: wsbus serve --config FILE"
        else:
            what = f"gateway {user.owner!r}: wsbus serve --config FILE"
        lines = [
            f"# wsbus settings for {what}",
            "# Written by `wsbus nats-config`. It holds a password: keep it readable by that",
            "# process's user only.",
            "[serve]",
            'bus = "nats"',
            "",
        ]
        if user.role == "gateway" and user.owner != ANY_GATEWAY:
            lines += ["[gateway]", f"node = {_toml(user.owner)}", ""]
        lines.append("[nats]")
        if self.servers:
            lines.append(f"servers = [{', '.join(_toml(url) for url in self.servers)}]")
        lines += [
            f"user = {_toml(user.name)}",
            f"password = {_toml(user.password)}",
            f"prefix = {_toml(self.prefix)}",
            "",
        ]
        return "\n".join(lines)


def _quote(text: str) -> str:
    # Every string is quoted: unquoted, nats-server reads "$..." as a variable.
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _items(items: Iterable[str], indent: str) -> list[str]:
    return [f"{indent}{_quote(item)}," for item in items]


def _toml(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _bucket_reads(bucket: str, *, follow: bool, create: bool) -> list[str]:
    """What nats-py publishes to open (or create) a key-value bucket, read it, follow it."""
    api = "$JS.API"
    stream = f"KV_{bucket}"
    subjects = [f"{api}.STREAM.INFO.{stream}"]
    if create:
        # Gateways only: whoever creates a bucket's stream chooses what it stores (see
        # wsbus_nats.buckets; every process checks it when it opens it).
        subjects.append(f"{api}.STREAM.CREATE.{stream}")
    subjects += [
        f"{api}.DIRECT.GET.{stream}",
        f"{api}.DIRECT.GET.{stream}.>",
        f"{api}.STREAM.MSG.GET.{stream}",
    ]
    if follow:
        # A watch is an ordered push consumer: created (with or without a name and
        # filter), asked about, deleted, and its flow control answered.
        subjects += [
            f"{api}.CONSUMER.CREATE.{stream}",
            f"{api}.CONSUMER.CREATE.{stream}.>",
            f"{api}.CONSUMER.INFO.{stream}.>",
            f"{api}.CONSUMER.DELETE.{stream}.>",
            f"$JS.FC.{stream}.>",
        ]
    return subjects


def _history(subjects: Subjects, *, gateway: bool) -> list[str]:
    """What reading (gateways) or appending to (services) the history stream needs."""
    api = "$JS.API"
    stream = subjects.history_stream
    if not gateway:
        # A service reads the stream's settings and a group's last entry (the request
        # names the subject: no other entry can be read this way).
        return [
            f"{api}.STREAM.INFO.{stream}",
            f"{api}.DIRECT.GET.{stream}.{subjects.history_subjects}",
        ]
    return [
        f"{api}.STREAM.INFO.{stream}",
        f"{api}.STREAM.CREATE.{stream}",
        f"{api}.DIRECT.GET.{stream}",
        f"{api}.DIRECT.GET.{stream}.>",
        f"{api}.STREAM.MSG.GET.{stream}",
        # A read is an ordered consumer filtered to the group.
        f"{api}.CONSUMER.CREATE.{stream}",
        f"{api}.CONSUMER.CREATE.{stream}.>",
        f"{api}.CONSUMER.INFO.{stream}.>",
        f"{api}.CONSUMER.DELETE.{stream}.>",
        f"$JS.FC.{stream}.>",
    ]


def _directory(subjects: Subjects, writes: Sequence[str], *, create: bool) -> list[str]:
    return [
        "$JS.API.INFO",
        *_bucket_reads(subjects.gateways_bucket, follow=True, create=create),
        *_bucket_reads(subjects.services_bucket, follow=True, create=create),
        *_bucket_reads(subjects.aliases_bucket, follow=False, create=create),
        *writes,
    ]


def service_permissions(subjects: Subjects, service: str, *, presence: bool = False) -> Permissions:
    """Return what service ``service`` may do: send as itself, read its own traffic.

    Args:
        subjects: the deployment's subjects.
        service: the service's name.
        presence: it declared ``wsbus.presence``: it may hear the gateways' presence
            events.
    """
    p = subjects.prefix
    return Permissions(
        publish=(
            subjects.to_gateway("*", service),
            subjects.to_service("*", "svc", service),
            # Its own history entries only (any group): the last token names it.
            f"{p}.hist.*.{service}",
            # One token after the service's: exactly <service>.<instance> keys.
            *_directory(subjects, [f"$KV.{subjects.services_bucket}.{service}.*"], create=False),
            *_history(subjects, gateway=False),
        ),
        subscribe=(
            subjects.service_inbox(service),
            f"{p}.reply.{service}.>",
            *([subjects.presence_all] if presence else []),
            # Its own inbox only: answers to others (session records, history reads,
            # key-value reads) are not its to read.
            f"{subjects.inbox('svc', service)}.>",
        ),
    )


def gateway_permissions(subjects: Subjects, node: str = ANY_GATEWAY) -> Permissions:
    """Return what gateway ``node`` (``*``: any gateway) may do."""
    p = subjects.prefix
    sessions = subjects.sessions_bucket
    return Permissions(
        publish=(
            subjects.to_service("*", "gw", node),
            f"{p}.reply.>",
            subjects.presence(node),
            *_directory(
                subjects,
                [
                    f"$KV.{subjects.gateways_bucket}.{node}",
                    f"$KV.{subjects.aliases_bucket}.>",
                    f"$KV.{sessions}.>",
                ],
                create=True,
            ),
            *_bucket_reads(sessions, follow=False, create=True),
            *_history(subjects, gateway=True),
        ),
        subscribe=(
            subjects.gateway_inbox(node),
            subjects.presence_all,
            f"{subjects.inbox('gw', node)}.>",
        ),
    )


def plan(
    services: Sequence[str],
    gateways: Sequence[str] = (),
    *,
    any_gateway: bool = False,
    prefix: str = "wsbus",
    account: str = DEFAULT_ACCOUNT,
    servers: Sequence[str] = (),
    presence: Sequence[str] = (),
) -> Access:
    """Return the users of a deployment, with new random passwords.

    Args:
        services: the services' names (``Service.name``), one user each (``svc-NAME``).
        presence: those of ``services`` that hear the gateways' presence events (they
            declared ``wsbus.presence``); the others may not.
        gateways: gateway node ids (``--node``), one user each (``gw-NODE``).
        any_gateway: add a ``gateways`` user that any gateway may use, whatever its node
            id (one gateway can then pose as another: prefer named nodes).
        prefix: the subjects' prefix (``NatsConfig.prefix``).
        account: the NATS account to put them in.
        servers: server URLs for the credentials files.

    Raises:
        ConfigError: a name is not one subject token, is given twice, or there is no
            service or no gateway.
    """
    check_tokens("prefix", [prefix])
    check_tokens("service", services)
    check_tokens("gateway node", gateways)
    if not is_token(account):
        raise ConfigError(f"account {account!r}: letters, digits, '-' or '_' only")
    for kind, names in (("service", services), ("gateway node", gateways)):
        twice = sorted({name for name in names if list(names).count(name) > 1})
        if twice:
            raise ConfigError(f"{kind} {twice[0]!r} is given twice")
    if not services:
        raise ConfigError("give at least one service (--service NAME)")
    unknown = sorted(set(presence) - set(services))
    if unknown:
        raise ConfigError(f"--presence {unknown[0]!r} is not one of the services given")
    if not gateways and not any_gateway:
        raise ConfigError("give at least one gateway (--gateway NODE, or --any-gateway)")
    subjects = Subjects(prefix)
    users = [
        NatsUser(
            f"svc-{name}",
            _password(),
            "service",
            name,
            service_permissions(subjects, name, presence=name in presence),
        )
        for name in services
    ]
    users += [
        NatsUser(f"gw-{node}", _password(), "gateway", node, gateway_permissions(subjects, node))
        for node in gateways
    ]
    if any_gateway:
        users.append(
            NatsUser("gateways", _password(), "gateway", ANY_GATEWAY, gateway_permissions(subjects))
        )
    return Access(prefix, account, tuple(users), tuple(servers))


def _password() -> str:
    return secrets.token_urlsafe(24)


def write(access: Access, directory: str | os.PathLike[str]) -> list[Path]:
    """Write the server configuration and one credentials file per user; return the paths.

    ``DIRECTORY/nats-server.conf`` and ``DIRECTORY/<user>.toml``, each readable by this
    user only (0600): they hold passwords. The directory is created (0700) if missing;
    existing files are replaced.

    Raises:
        OSError: a file cannot be written.
    """
    path = Path(directory)
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    written = [_write_private(path / SERVER_CONFIG, access.server_config())]
    for user in access.users:
        written.append(_write_private(path / f"{user.name}.toml", access.credentials(user)))
    return written


def _write_private(path: Path, text: str) -> Path:
    # Created 0600 from the start (never readable by others, even for a moment), and
    # truncated: an older file of the same name is replaced.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as file:
        file.write(text)
    os.chmod(path, 0o600)
    return path
