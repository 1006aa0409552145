"""Every setting of ``wsbus serve`` from a TOML file, the environment and the command line.

A file (``wsbus serve --config wsbus.toml``) has one table per part of wsbus::

    [serve]             what to run: the bus, the edge, the address, services, plugins,
                        the event loop
    [auth]              bearer tokens (TokenAuth)
    [gateway]           wsbus.GatewayConfig
    [gateway.wire]      wsbus.WireLimits
    [gateway.history]   wsbus.HistoryConfig
    [gateway.resume]    wsbus.ResumeSettings
    [websockets]        wsbus_websockets.EdgeConfig (the WebSocket edge)
    [pyro]              wsbus_pyro.PyroConfig (the Pyro bus)

The first three are the command's and the core's; the others come from the installed
adapters (:mod:`wsbus_cli.adapters`): each bus or edge brings its table as a
:class:`Section`. Each table is checked against the struct that holds it: an unknown key is
refused with its full dotted name (``gateway.rtae``), a value of the wrong type names the
setting and the type it needs, and the structs' own range checks run as they do from Python.
An adapter's table is read with the adapter's own struct, imported only when that table is
used, so a missing extra costs nothing until then.

Precedence, lowest first: the structs' defaults, the file, the environment (secrets:
``WSBUS_SECRET``, ``WSBUS_TOKENS``, ``WSBUS_RESUME_SECRET``), the command-line flags.
"""

from __future__ import annotations

import difflib
import enum
import inspect
import json
import math
import os
import re
import tomllib
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

import msgspec

from wsbus.errors import ConfigError

from .loops import check_loop

__all__ = [
    "FLAGS",
    "NODE_PATTERN",
    "NODE_RULE",
    "RESUME_SECRET_ENV",
    "SECRETS",
    "SECRET_ENV",
    "SECTIONS",
    "TOKENS_ENV",
    "AuthSettings",
    "Section",
    "ServeSettings",
    "Settings",
    "all_flags",
    "all_sections",
    "attribute_docs",
    "check_node",
    "check_port",
    "describe",
    "load_settings",
    "parse_tokens",
    "render_docs",
    "render_toml",
    "render_value",
    "secret_settings",
    "section_struct",
    "write_docs",
]

NODE_PATTERN: Final = re.compile(r"[A-Za-z0-9_-]{1,32}")
"""What a gateway's node id must match: it starts every connection id and names the gateway
in the Pyro name server, so no dots, spaces or punctuation."""

NODE_RULE: Final = "a node id is 1-32 of A-Z a-z 0-9 _ -"
"""The node-id rule, as errors state it."""

_PORT_RULE: Final = "a port is 0-65535 (0 picks a free one)"

SECRET_ENV: Final = "WSBUS_SECRET"
"""The environment variable holding the Pyro shared secret."""
TOKENS_ENV: Final = "WSBUS_TOKENS"
"""The environment variable holding bearer tokens, ``user:token`` pairs separated by commas."""

RESUME_SECRET_ENV: Final = "WSBUS_RESUME_SECRET"
"""The environment variable holding the key resume tokens are signed with (hex)."""

_REDACTED: Final = "<redacted>"
SECRETS: Final = frozenset({"auth.tokens", "gateway.resume.secret"})
"""The command's settings whose values are never printed (``wsbus config check``, errors);
the adapters name theirs in :attr:`Section.secrets` (see :func:`secret_settings`)."""


def secret_settings() -> frozenset[str]:
    """Return the dotted names of every setting whose value is never printed."""
    found = set(SECRETS)
    for section in all_sections():
        found.update(f"{section.name}.{name}" for name in section.secrets)
    return frozenset(found)


class ServeSettings(msgspec.Struct, frozen=True, kw_only=True):
    """What ``wsbus serve`` runs.

    Attributes:
        bus: the bus adapter: ``memory`` (services in this process), ``pyro`` (services as
            processes on a Pyro message bus), or another installed one (``wsbus --help``
            lists them).
        edge: the edge adapter clients connect through: ``websockets``, or another
            installed one.
        host: the address the WebSocket port listens on.
        port: the WebSocket port; 0 picks a free one.
        services: with ``bus = "memory"``, the ``MODULE:CLASS`` services to run in-process.
        plugins: plugin modules (``MODULE``) or objects (``MODULE:NAME``; a class is
            instantiated with no arguments) to register.
        app_dir: a directory put first on the import path, so that services and plugins
            are found there (as uvicorn's ``--app-dir``).
        loop: the event loop the gateway runs on: ``asyncio`` (the standard library's) or
            ``uvloop`` (needs ``pip install 'wsbus[uvloop]'``; docs/performance.md says
            where it helps).
        service_tracing: the services this command runs (``services``, or the one
            ``wsbus service`` runs) make OpenTelemetry spans and carry trace context on
            (``wsbus.Service.tracing``; needs ``pip install 'wsbus[otel]'``, and an SDK
            configured: docs/tracing.md). The gateway's own spans are ``gateway.tracing``.
    """

    bus: str = "memory"
    host: str = "127.0.0.1"
    port: int = 8765
    services: tuple[str, ...] = ()
    plugins: tuple[str, ...] = ()
    app_dir: str = "."
    edge: str = "websockets"
    loop: Literal["asyncio", "uvloop"] = "asyncio"
    service_tracing: bool = False

    def __post_init__(self) -> None:
        check_port("serve.port", self.port)


class AuthSettings(msgspec.Struct, frozen=True, kw_only=True):
    """Bearer-token authentication (the built-in TokenAuth plugin).

    Attributes:
        tokens: user name -> that user's bearer token. A client presenting a listed token
            is accepted as its user; an unknown token is refused. Keep tokens out of files
            others can read: ``WSBUS_TOKENS="ann:t0k3n,bob:s3cr3t"`` sets them from the
            environment instead.
    """

    tokens: dict[str, str] = msgspec.field(default_factory=dict)


def check_port(name: str, port: int) -> None:
    """Refuse a port number outside 0-65535, naming the setting."""
    if not 0 <= port <= 65535:
        raise ConfigError(f"{name} {port}: {_PORT_RULE}")


def check_node(name: str, node: str | None) -> None:
    """Refuse a node id that cannot start a connection id or name a Pyro object."""
    if node is not None and NODE_PATTERN.fullmatch(node) is None:
        raise ConfigError(f"{name} {node!r}: {NODE_RULE}")


@dataclass(frozen=True)
class Section:
    """One table of the configuration file.

    Attributes:
        name: the table's name (``gateway``, ``pyro``).
        load: returns the struct the table is read into (imported only when called, so
            that a missing extra costs nothing until the table is used).
        extra: the pip extra the struct needs, if any (named when importing it fails).
        title: what the table configures, for the docs.
        flags: setting (a field of the struct) -> the flag that sets it, for the docs
            (the option itself is added by the adapter's ``wsbus_cli_options`` hook).
        environment: setting -> the environment variable that sets it (below the flags).
        secrets: the settings whose values are never printed.
        ports: the settings that are port numbers (0-65535), checked with the flag's name.
    """

    name: str
    load: Callable[[], type[msgspec.Struct]]
    extra: str | None
    title: str
    flags: Mapping[str, str] = field(default_factory=dict)
    environment: Mapping[str, str] = field(default_factory=dict)
    secrets: frozenset[str] = frozenset()
    ports: tuple[str, ...] = ()


def _gateway() -> type[msgspec.Struct]:
    from wsbus.gateway import GatewayConfig

    return GatewayConfig


SECTIONS: Final = (
    Section("serve", lambda: ServeSettings, None, "what `wsbus serve` runs"),
    Section("auth", lambda: AuthSettings, None, "bearer-token authentication"),
    Section("gateway", _gateway, None, "the gateway (`wsbus.GatewayConfig`)"),
)
"""The command's own tables; the adapters bring theirs (:func:`all_sections`)."""


def all_sections() -> tuple[Section, ...]:
    """Return every table: the command's, then the installed edges', then the buses'."""
    from .adapters import installed

    return (*SECTIONS, *installed().sections())


@dataclass
class Settings:
    """The effective settings: the structs every part of wsbus is built with.

    An adapter's table is an attribute too (``settings.websockets``, ``settings.pyro``):
    its struct, or None when it is not used.

    Attributes:
        serve: what to run.
        auth: bearer tokens.
        gateway: the gateway's settings.
        adapters: the adapters' tables in use, by table name.
        sources: where each setting that is not a default came from (``"file"``, an
            environment variable, or a flag), by dotted name.
    """

    serve: ServeSettings
    auth: AuthSettings
    gateway: Any
    adapters: dict[str, Any] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)

    def __getattr__(self, name: str) -> Any:
        # Only called for names that are not fields: an adapter's table, None if unused.
        if name.startswith("_"):
            raise AttributeError(name)
        return self.__dict__.get("adapters", {}).get(name)

    def sections(self) -> list[tuple[str, msgspec.Struct]]:
        """Return (table name, struct) for each table in use, in :func:`all_sections` order."""
        found = [(section.name, getattr(self, section.name)) for section in all_sections()]
        return [(name, value) for name, value in found if value is not None]


def parse_tokens(text: str, source: str = TOKENS_ENV) -> dict[str, str]:
    """Parse ``user:token`` pairs separated by commas or white space into user -> token.

    Raises:
        ConfigError: a pair is malformed (the message never repeats a token).
    """
    tokens: dict[str, str] = {}
    for number, pair in enumerate(re.split(r"[,\s]+", text.strip()), 1):
        if not pair:
            continue
        user, sep, token = pair.partition(":")
        if not sep or not user or not token:
            raise ConfigError(
                f"{source}: pair {number} is not USER:TOKEN; write for example "
                f'{source}="ann:t0k3n,bob:s3cr3t"'
            )
        tokens[user] = token
    return tokens


def load_settings(
    path: str | os.PathLike[str] | None = None,
    *,
    flags: Mapping[str, tuple[str, Any]] | None = None,
    environ: Mapping[str, str] | None = None,
    need: Iterable[str] = (),
) -> Settings:
    """Read the settings: defaults, then the file, then the environment, then the flags.

    The tables of the chosen bus (``serve.bus``) and edge (``serve.edge``) are built, and
    those of ``need`` and of any adapter the file or a flag sets; the others are None.

    Args:
        path: a TOML file, or None for none.
        flags: dotted setting name -> (the flag as typed, its value), for the flags given.
        environ: the environment (``os.environ`` by default).
        need: more adapter tables to build (``wsbus nameserver`` needs ``pyro``).

    Raises:
        ConfigError: the file cannot be read, a setting is unknown, ill-typed or out of
            range (the message names it and where it came from), or the bus or edge named
            is not installed (the message lists those that are).
    """
    from .adapters import find_bus, find_edge

    environ = os.environ if environ is None else environ
    flags = flags or {}
    by_name = {section.name: section for section in all_sections()}
    raw = _read(path) if path is not None else {}
    origin = f"{os.fspath(path)}" if path is not None else "settings"
    for key, value in raw.items():
        if key not in by_name:
            raise ConfigError(_unknown(origin, key, by_name, table=not isinstance(value, dict)))
        if not isinstance(value, dict):
            raise ConfigError(f"{origin}: {key} must be a table ([{key}])")

    # Layer the values as nested dicts of the raw values, remembering each one's source.
    layered: dict[str, dict[str, Any]] = {name: dict(raw.get(name, {})) for name in by_name}
    sources: dict[str, str] = {}
    for name, table in layered.items():
        for dotted in _leaves(name, table):
            sources[dotted] = origin
    for dotted, (flag, value) in flags.items():
        name, *path_in = dotted.split(".")
        table = layered[name]
        for part in path_in[:-1]:
            table = table.setdefault(part, {})
        table[path_in[-1]] = value
        sources[dotted] = flag
    # The environment ranks below the flags: set only what no flag set.
    tokens = environ.get(TOKENS_ENV)
    if tokens and "auth.tokens" not in flags:
        layered["auth"]["tokens"] = parse_tokens(tokens)
        sources["auth.tokens"] = TOKENS_ENV
    resume_secret = environ.get(RESUME_SECRET_ENV)
    if resume_secret and "gateway.resume.secret" not in flags:
        resume = layered["gateway"].get("resume")
        if not isinstance(resume, dict):
            resume = {}
        layered["gateway"]["resume"] = {**resume, "secret": resume_secret}
        sources["gateway.resume.secret"] = RESUME_SECRET_ENV

    serve = _build(by_name["serve"], layered["serve"], sources)
    auth = _build(by_name["auth"], layered["auth"], sources)
    gateway = _build(by_name["gateway"], layered["gateway"], sources)
    check_node(_named("gateway.node", sources), gateway.node)
    check_loop(serve.loop, _named("serve.loop", sources))
    bus = find_bus(serve.bus, _named("serve.bus", sources))
    edge = find_edge(serve.edge, _named("serve.edge", sources))
    if serve.services and not bus.runs_services:
        raise ConfigError(
            f"serve.services (--service) runs services in this process, which the "
            f'{serve.bus} bus does not: use it with bus = "memory", or run each with '
            "`wsbus service MODULE:CLASS`"
        )
    wanted = {*need, *(s.name for s in (bus.section, edge.section) if s is not None)}
    adapters: dict[str, Any] = {}
    for name, section in by_name.items():
        if section in SECTIONS or not (name in wanted or name in raw or layered[name]):
            continue
        for setting, variable in section.environment.items():
            value = environ.get(variable)
            dotted = f"{name}.{setting}"
            if value and dotted not in flags:
                layered[name][setting] = value
                sources[dotted] = variable
        struct = _build(section, layered[name], sources)
        for setting in section.ports:
            check_port(_named(f"{name}.{setting}", sources), getattr(struct, setting))
        adapters[name] = struct
    return Settings(serve, auth, gateway, adapters, sources)


def _read(path: str | os.PathLike[str]) -> dict[str, Any]:
    try:
        with open(path, "rb") as file:
            data: dict[str, Any] = tomllib.load(file)
    except FileNotFoundError:
        raise ConfigError(f"--config {os.fspath(path)}: no such file") from None
    except tomllib.TOMLDecodeError as exc:
        # tomllib's text says where (line and column); it is shown, not interpreted.
        raise ConfigError(f"{os.fspath(path)} is not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"--config {os.fspath(path)}: {exc.strerror or exc}") from None
    return data


def _leaves(prefix: str, table: Mapping[str, Any]) -> Iterable[str]:
    for key, value in table.items():
        dotted = f"{prefix}.{key}"
        if isinstance(value, dict) and dotted != "auth.tokens":
            yield from _leaves(dotted, value)
        else:
            yield dotted


def _named(dotted: str, sources: Mapping[str, str]) -> str:
    """Name a setting as its user wrote it: the flag, or the dotted name (and the file)."""
    source = sources.get(dotted)
    if source is None:
        return dotted
    if source.startswith("-"):
        return source
    if re.fullmatch(r"[A-Z][A-Z0-9_]*", source):  # an environment variable (WSBUS_SECRET)
        return f"{dotted} (from ${source})"
    return f"{dotted} (in {source})"


def _unknown(origin: str, key: str, known: Iterable[str], *, table: bool = False) -> str:
    close = difflib.get_close_matches(key.rpartition(".")[2], list(known), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f"; known: {', '.join(sorted(known))}"
    what = "setting" if table or "." in key else "table"
    return f"{origin}: unknown {what} {key!r}{hint}"


def section_struct(section: Section) -> type[msgspec.Struct]:
    """Return the struct of ``section``'s table, importing it now.

    Raises:
        ConfigError: its extra is not installed (the message says what to install).
    """
    try:
        return section.load()
    except ImportError:
        raise ConfigError(
            f"the [{section.name}] settings need the {section.extra} extra: "
            f"pip install 'wsbus[{section.extra}]'"
        ) from None


def _build(section: Section, table: dict[str, Any], sources: Mapping[str, str]) -> Any:
    return _struct(section_struct(section), table, section.name, sources)


def _struct(
    cls: type[msgspec.Struct], table: Mapping[str, Any], prefix: str, sources: Mapping[str, str]
) -> Any:
    fields = {info.name: info for info in msgspec.structs.fields(cls)}
    values: dict[str, Any] = {}
    for key, value in table.items():
        dotted = f"{prefix}.{key}"
        info = fields.get(key)
        if info is None:
            origin = sources.get(dotted, "settings")
            raise ConfigError(_unknown(origin, dotted, fields))
        nested = _struct_type(info.type)
        if nested is not None and isinstance(value, dict):
            values[key] = _struct(nested, value, dotted, sources)
        else:
            values[key] = _convert(value, info.type, _named(dotted, sources), dotted)
    try:
        return cls(**values)
    except ConfigError as exc:
        # The struct's own range check: say which table, and where its values came from.
        given = sorted({sources[d] for d in sources if d.startswith(prefix + ".")})
        where = f" (set in {', '.join(given)})" if given else ""
        raise ConfigError(f"[{prefix}] {exc}{where}") from None


def _struct_type(tp: Any) -> type[msgspec.Struct] | None:
    return tp if isinstance(tp, type) and issubclass(tp, msgspec.Struct) else None


def _optional(tp: Any) -> Any:
    """Return X for ``X | None``, else None."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [arg for arg in typing.get_args(tp) if arg is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0]
    return None


def _convert(value: Any, tp: Any, name: str, dotted: str) -> Any:
    inner = _optional(tp)
    # TOML has no null: ``false`` turns an optional setting off (``ping_interval = false``).
    if inner is not None and value is False and inner is not bool:
        return None
    if value is None and inner is not None:
        return None
    try:
        return msgspec.convert(value, tp)
    except msgspec.ValidationError:
        pass
    shown = _REDACTED if dotted in secret_settings() else _show(value)
    raise ConfigError(f"{name} = {shown}: expected {describe(tp)}")


def _show(value: Any) -> str:
    text = render_value(value)
    return text if len(text) <= 60 else text[:57] + "..."


def describe(tp: Any) -> str:
    """Describe a setting's type in words, for errors and the docs."""
    inner = _optional(tp)
    if inner is not None:
        return f"{describe(inner)}, or false for none"
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(json.dumps(arg) for arg in typing.get_args(tp))
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return "one of " + ", ".join(json.dumps(member.value) for member in tp)
    if origin in (tuple, list):
        args = typing.get_args(tp)
        return f"a list of {_plural(describe(args[0]))}" if args else "a list"
    if origin is dict:
        return "a table of strings"
    if _struct_type(tp) is not None:
        return "a table"
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    if tp in names:
        return names[tp]
    return getattr(tp, "__name__", str(tp))


def _plural(text: str) -> str:
    return {"a string": "strings", "an integer": "integers", "a number": "numbers"}.get(text, text)


# -- printing -----------------------------------------------------------------------------


def render_value(value: Any) -> str:
    """Write one value as TOML."""
    if isinstance(value, enum.Enum):
        value = value.value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return "nan" if math.isnan(value) else repr(value)
    if isinstance(value, str):
        # A JSON string is a valid TOML basic string for every character JSON escapes.
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(render_value(item) for item in value) + "]"
    if isinstance(value, dict):
        items = (f"{json.dumps(str(k))} = {render_value(v)}" for k, v in value.items())
        return "{ " + ", ".join(items) + " }" if value else "{}"
    return json.dumps(str(value))


def render_toml(settings: Settings) -> str:
    """Write the effective settings as a TOML file, with secrets redacted.

    A setting that is None (off, or decided at run time) is written as a comment. A comment
    after a value says where it came from when that is not the default.
    """
    lines: list[str] = []
    secret = secret_settings()
    for name, struct in settings.sections():
        _render_table(lines, name, struct, settings.sources, secret)
    return "\n".join(lines).rstrip() + "\n"


def _render_table(
    lines: list[str],
    prefix: str,
    struct: msgspec.Struct,
    sources: Mapping[str, str],
    secret: frozenset[str],
) -> None:
    lines.append(f"[{prefix}]")
    nested: list[tuple[str, msgspec.Struct]] = []
    for info in msgspec.structs.fields(type(struct)):
        value = getattr(struct, info.name)
        dotted = f"{prefix}.{info.name}"
        if isinstance(value, msgspec.Struct):
            nested.append((dotted, value))
            continue
        source = sources.get(dotted)
        note = f"  # from {source}" if source else ""
        if value is None:
            lines.append(f"# {info.name} = (none){note}")
        elif dotted in secret and value:
            redacted = {k: _REDACTED for k in value} if isinstance(value, dict) else _REDACTED
            lines.append(f"{info.name} = {render_value(redacted)}{note}")
        else:
            lines.append(f"{info.name} = {render_value(value)}{note}")
    lines.append("")
    for dotted, value in nested:
        _render_table(lines, dotted, value, sources, secret)


# -- the documentation --------------------------------------------------------------------


def attribute_docs(cls: type) -> dict[str, str]:
    """Return each attribute's description from Google-style ``Attributes:`` sections.

    A class's own section, over those of the classes it inherits from (a base struct
    documents the fields it declares: ``wsbus.http.OpsConfig``).
    """
    found: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if klass.__dict__.get("__doc__"):
            found.update(_own_attribute_docs(klass.__dict__["__doc__"]))
    return found


def _own_attribute_docs(text: str) -> dict[str, str]:
    """The descriptions of one docstring's ``Attributes:`` section."""
    doc = inspect.cleandoc(text)
    found: dict[str, str] = {}
    inside = False
    current: str | None = None
    for line in doc.splitlines():
        if line.strip() == "Attributes:":
            inside = True
            continue
        if not inside:
            continue
        if line and not line.startswith(" "):
            break  # the next section
        match = re.match(r" {4}(\w+)(?: \(.*?\))?: (.*)", line)
        if match:
            current = match.group(1)
            found[current] = match.group(2).strip()
        elif current is not None and line.strip():
            found[current] += " " + line.strip()
    return found


_DOC_HEAD: Final = """\
# Configuration

<!-- Generated by `wsbus config docs` from the settings structs;
tests/wsbus_cli/test_config.py checks that it is up to date. Edit the structs' docstrings,
then regenerate:
    wsbus config docs > docs/configuration.md -->

Every setting of `wsbus serve`, with its default. Set them, lowest precedence first:

1. the defaults below (the same as the structs' defaults in Python);
2. a TOML file: `wsbus serve --config wsbus.toml`;
3. the environment, for secrets: `WSBUS_SECRET` (`pyro.secret`, the Pyro shared secret),
   `WSBUS_TOKENS` (`auth.tokens`, as `user:token` pairs separated by commas:
   `WSBUS_TOKENS="ann:t0k3n,bob:s3cr3t"`) and `WSBUS_RESUME_SECRET`
   (`gateway.resume.secret`, the key resume tokens are signed with, in hex);
4. command-line flags, for the common settings (the flag is named in each row).

`wsbus config check wsbus.toml` validates a file and prints the effective settings (secrets
redacted) with where each came from. An unknown key is refused with its full dotted name, a
value of the wrong type names the setting and the type it needs. TOML has no null: write
`false` to turn off a setting whose default is "none" (`ping_interval = false`).

`wsbus bus`, `wsbus service` and `wsbus nameserver` take `--config` too, and read its
`[pyro]` table (and `serve.app_dir`).

```toml
[serve]
bus = "pyro"
port = 8765
plugins = ["myapp.plugins"]

[gateway]
rate = 50.0
alias_policy = "suffix"

[gateway.wire]
max_frame_bytes = 131072

[gateway.history]
groups = ["room.*"]
size = 200

[gateway.resume]
window = 300.0

[websockets]
allowed_origins = ["https://app.example.com"]

[pyro]
ns_host = "10.0.0.5"
```
"""


FLAGS: Final = {
    "serve.bus": "--bus",
    "serve.host": "--host",
    "serve.port": "--port",
    "serve.services": "--service",
    "serve.plugins": "--plugin",
    "serve.app_dir": "--app-dir",
    "serve.edge": "--edge",
    "serve.loop": "--loop",
    "gateway.node": "--node",
    "gateway.max_connections": "--max-connections",
    "gateway.rate": "--rate",
    "gateway.burst": "--burst",
    "gateway.alias_policy": "--alias-policy",
    "gateway.allow_anonymous": "--no-anonymous",
    "gateway.tracing": "--tracing",
    "serve.service_tracing": "--service-tracing, wsbus service --tracing",
    "auth.tokens": "$WSBUS_TOKENS",
    "gateway.resume.secret": "$WSBUS_RESUME_SECRET",
}
"""The flag (or environment variable) that sets each of the command's own settings."""


def all_flags() -> dict[str, str]:
    """Return the flag (and environment variable) that sets a setting, by dotted name.

    The command's own (:data:`FLAGS`), then those the adapters' sections name.
    """
    found = dict(FLAGS)
    for section in all_sections():
        for setting in {*section.flags, *section.environment}:
            names = [section.flags.get(setting), section.environment.get(setting)]
            env = names[1]
            found[f"{section.name}.{setting}"] = ", ".join(
                name if name != env else f"${name}" for name in names if name
            )
    return found


def render_docs() -> str:
    """Return docs/configuration.md: every setting with its type, default and meaning."""
    parts = [_DOC_HEAD]
    flags = all_flags()
    for section in all_sections():
        cls = section_struct(section)
        parts.append(f"\n## [{section.name}]: {section.title}\n")
        _doc_table(parts, cls, section.name, flags)
    return "".join(parts)


def _doc_table(
    parts: list[str], cls: type[msgspec.Struct], prefix: str, flags: Mapping[str, str]
) -> None:
    docs = attribute_docs(cls)
    nested: list[tuple[str, type[msgspec.Struct]]] = []
    parts.append("\n| setting | type | default | flag | meaning |\n|---|---|---|---|---|\n")
    for info in msgspec.structs.fields(cls):
        dotted = f"{prefix}.{info.name}"
        struct = _struct_type(info.type)
        if struct is not None:
            nested.append((dotted, struct))
            continue
        if info.default is not msgspec.NODEFAULT:
            default = info.default
        elif info.default_factory is not msgspec.NODEFAULT:
            default = info.default_factory()
        else:
            default = None
        shown = "none" if default is None else render_value(default)
        flag = flags.get(dotted, "")
        # reST literals (``x``) to Markdown ones (`x`); a pipe would end the table cell.
        meaning = docs.get(info.name, "").replace("``", "`").replace("|", "\\|")
        parts.append(
            f"| `{dotted}` | {describe(info.type)} | `{shown}` | "
            f"{f'`{flag}`' if flag else ''} | {meaning} |\n"
        )
    for dotted, struct in nested:
        parts.append(f"\n### [{dotted}]\n")
        _doc_table(parts, struct, dotted, flags)


def write_docs(path: str | os.PathLike[str]) -> None:
    """Write :func:`render_docs` to ``path``."""
    Path(path).write_text(render_docs(), encoding="utf-8")
