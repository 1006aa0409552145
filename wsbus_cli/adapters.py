"""Buses and edges, found through entry points: what an adapter gives the ``wsbus`` command.

An adapter is an object named by an entry point of the group :data:`BUSES` (``wsbus.buses``)
or :data:`EDGES` (``wsbus.edges``) of any installed distribution::

    [project.entry-points."wsbus.buses"]
    mybus = "mybus.adapter:adapter"

The object has a name, a one-line description, its settings section (a table of the
settings file, read into the adapter's own ``msgspec.Struct``) and a factory (see
:class:`BusAdapter`, :class:`EdgeAdapter`); it may also implement the hooks below (marked
with :data:`hookimpl`) to add options to ``wsbus serve``/``wsbus demo`` and subcommands of its
own. Nothing in the core (:mod:`wsbus`) knows about any of this: ``wsbus serve --bus mybus``
works once the distribution is installed.

An adapter's entry-point module must import no transport library at import time: the
command line loads every installed adapter to build its ``--help``, so a missing extra has
to cost nothing until that adapter is used (then :class:`wsbus.errors.MissingExtra` says
what to install).
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Final, Protocol, runtime_checkable

import pluggy

from wsbus.bus import Bus
from wsbus.errors import ConfigError, PluginError
from wsbus.gateway import Gateway
from wsbus.service import Service

from .config import Section

__all__ = [
    "BUSES",
    "EDGES",
    "BusAdapter",
    "Commands",
    "EdgeAdapter",
    "Installed",
    "Listening",
    "RunsServiceProcesses",
    "Section",
    "add_edge_flags",
    "edge_flags",
    "find_bus",
    "find_edge",
    "hookimpl",
    "hookspec",
    "installed",
    "port_number",
    "wsbus_cli_commands",
    "wsbus_cli_options",
]

BUSES: Final = "wsbus.buses"
"""The entry-point group of bus adapters."""
EDGES: Final = "wsbus.edges"
"""The entry-point group of edge adapters."""

hookspec: Final = pluggy.HookspecMarker("wsbus_cli")
"""Marks the hook specifications of the ``wsbus`` command (this module's ``wsbus_cli_*``)."""
hookimpl: Final = pluggy.HookimplMarker("wsbus_cli")
"""Marks an adapter's implementation of a ``wsbus_cli_*`` hook."""


class Listening(Protocol):
    """An edge serving a gateway: where it listens, and how to stop it."""

    @property
    def url(self) -> str:
        """The address clients connect to (``ws://127.0.0.1:8765/``)."""

    @property
    def port(self) -> int:
        """The port it listens on (the one picked when 0 was asked for)."""

    async def close(self) -> None:
        """Stop accepting clients and close the connections it has."""


@runtime_checkable
class BusAdapter(Protocol):
    """A bus the ``wsbus`` command can run a gateway on (entry-point group ``wsbus.buses``).

    Attributes:
        name: what ``--bus`` and ``serve.bus`` call it (the entry point's name).
        description: one line for ``wsbus --help``.
        section: its table of the settings file, or None when it has no settings.
        runs_services: whether it runs ``--service MODULE:CLASS`` services in the
            gateway's process (the memory bus does; a bus whose services are their own
            processes does not).
    """

    name: str
    description: str
    section: Section | None
    runs_services: bool

    def open(self, config: Any, services: Sequence[Service]) -> AbstractAsyncContextManager[Bus]:
        """Return a context that yields the bus ``wsbus serve`` runs (not yet started).

        Args:
            config: the adapter's settings (an instance of its section's struct), or None.
            services: the ``--service`` services, when :attr:`runs_services` is true.

        Raises:
            wsbus.errors.BusUnavailable: the bus cannot be reached (the message says what
                to start).
            wsbus.errors.MissingExtra: the transport library is not installed.
        """

    def demo(
        self, options: argparse.Namespace, services: Sequence[str]
    ) -> AbstractAsyncContextManager[Bus]:
        """Return a context that starts what ``wsbus demo --bus NAME`` needs, yields the bus.

        Leaving the context stops every process it started.

        Args:
            options: the parsed ``wsbus demo`` options (with this adapter's own).
            services: the demo's services, as ``MODULE:CLASS``.
        """


@runtime_checkable
class RunsServiceProcesses(Protocol):
    """A bus adapter whose services run as their own processes (``wsbus service``).

    An optional capability of a :class:`BusAdapter`, checked with ``isinstance``: ``wsbus
    service MODULE:CLASS --bus NAME`` runs the service on bus NAME when its adapter has it
    (the Pyro and NATS buses do; the memory bus runs services in the gateway's process).
    """

    def run_service(self, service: Service, config: Any) -> None:
        """Run ``service`` as this process on the bus, until SIGINT or SIGTERM (blocks).

        Args:
            service: the service, made from ``MODULE:CLASS``.
            config: the adapter's settings (an instance of its section's struct), or None.

        Raises:
            wsbus.errors.BusUnavailable: the bus cannot be reached (the message says what
                to start).
            wsbus.errors.MissingExtra: the transport library is not installed.
        """


@runtime_checkable
class EdgeAdapter(Protocol):
    """A way for clients to reach a gateway (entry-point group ``wsbus.edges``).

    Attributes:
        name: what ``--edge`` and ``serve.edge`` call it (the entry point's name).
        description: one line for ``wsbus --help``.
        section: its table of the settings file, or None when it has no settings.
    """

    name: str
    description: str
    section: Section | None

    async def serve(
        self,
        gateway: Gateway,
        host: str,
        port: int,
        config: Any,
        *,
        static_dir: str | None = None,
    ) -> Listening:
        """Put a started gateway on ``host:port``.

        Args:
            gateway: the started gateway.
            host: the address to listen on.
            port: the port; 0 picks a free one.
            config: the adapter's settings (an instance of its section's struct), or None.
            static_dir: a directory of files to serve beside it (the demo page), if any.

        Raises:
            OSError: the port cannot be listened on.
        """


class Commands:
    """Where an adapter adds its own ``wsbus`` subcommands (:func:`wsbus_cli_commands`)."""

    def __init__(self, add: Callable[..., argparse.ArgumentParser]) -> None:
        self._add = add

    def add(
        self,
        name: str,
        *,
        help: str,
        run: Callable[[argparse.Namespace], int | None],
        description: str | None = None,
    ) -> argparse.ArgumentParser:
        """Add ``wsbus NAME``; return its parser, for the options.

        Args:
            name: the subcommand.
            help: one line for ``wsbus --help``.
            run: called with the parsed options; returns the exit status (None for 0). It
                raises :class:`wsbus.errors.ConfigError` for a user's mistake (exit status
                2) and another :class:`wsbus.errors.WsbusError` or an ``OSError`` for a
                failure at run time (1); the command prints its message, no traceback.
            description: the text of ``wsbus NAME --help``.
        """
        parser = self._add(name, help=help, description=description or help)
        parser.set_defaults(run=run)
        return parser


@hookspec
def wsbus_cli_options(command: str, parser: argparse.ArgumentParser) -> None:
    """Add this adapter's options to ``wsbus COMMAND`` (``serve``, ``demo`` or ``service``).

    An option that sets one of the adapter's settings names it as its ``dest``, dotted
    (``dest="pyro.ns_port"``): ``wsbus serve`` then lays it over the settings file. Name
    its flag in the section's ``flags`` too: the configuration page lists it and errors
    name it. Options of ``demo`` reach :meth:`BusAdapter.demo`; ``wsbus service`` lays
    those of ``service`` over the settings file too, for
    :meth:`RunsServiceProcesses.run_service`.
    Every installed adapter's options are on the command whichever bus is chosen: name
    them after the adapter unless they are its own (``--ns-port``).
    """


@hookspec
def wsbus_cli_commands(commands: Commands) -> None:
    """Add this adapter's own subcommands (Pyro adds ``nameserver`` and ``bus``)."""


def edge_flags(prefix: str) -> dict[str, str]:
    """The flags of an edge's common settings, for its :class:`Section`'s ``flags``.

    ``prefix`` is ``""`` for the default edge (``--origin``), else the edge's name and a
    dash (``picows-``: ``--picows-origin``). :func:`add_edge_flags` adds the same flags.
    """
    return {
        "allowed_origins": f"--{prefix}origin",
        "static_dir": f"--{prefix}static",
        "metrics_path": f"--{prefix}metrics",
        "metrics_from": f"--{prefix}metrics-from",
    }


def add_edge_flags(parser: argparse.ArgumentParser, section: str, prefix: str, title: str) -> None:
    """Add an edge's common flags to ``wsbus serve``: origins, static files, metrics.

    Args:
        parser: the ``serve`` command's parser.
        section: the edge's settings section (``websockets``): each flag sets
            ``section.setting``.
        prefix: as for :func:`edge_flags`.
        title: the heading of the flags in ``--help``.
    """
    flags = edge_flags(prefix)
    group = parser.add_argument_group(title)
    group.add_argument(
        flags["allowed_origins"],
        dest=f"{section}.allowed_origins",
        action="append",
        default=None,
        metavar="ORIGIN",
        help="an allowed browser origin besides the server's own (repeatable)",
    )
    group.add_argument(
        flags["static_dir"],
        dest=f"{section}.static_dir",
        metavar="DIR",
        default=None,
        help="a directory to serve over HTTP",
    )
    group.add_argument(
        flags["metrics_path"],
        dest=f"{section}.metrics_path",
        metavar="PATH",
        default=None,
        help="serve Prometheus metrics at PATH, e.g. /metrics (off without it; needs "
        "wsbus[metrics])",
    )
    group.add_argument(
        flags["metrics_from"],
        dest=f"{section}.metrics_from",
        action="append",
        default=None,
        metavar="NETWORK",
        help="a network that may read the metrics (repeatable; loopback by default)",
    )


def port_number(text: str) -> int:
    """Parse a port number option (0-65535; 0 picks a free one), for ``type=`` of argparse."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text}: a port is 0-65535 (0 picks a free one)")
    return port


@dataclass
class Installed:
    """The adapters of the installed distributions.

    Attributes:
        buses: bus adapters by name.
        edges: edge adapters by name.
        broken: entry points that could not be loaded, by (group, name): what went wrong,
            with the distribution and what to do.
        hooks: the plugin manager the adapters are registered with.
    """

    buses: dict[str, BusAdapter] = field(default_factory=dict)
    edges: dict[str, EdgeAdapter] = field(default_factory=dict)
    broken: dict[tuple[str, str], str] = field(default_factory=dict)
    hooks: pluggy.PluginManager = field(default_factory=lambda: _manager())
    # What each loaded entry point is: (group, name) -> (who it is, what to do if it fails).
    _origins: dict[tuple[str, str], tuple[str, str]] = field(default_factory=dict, repr=False)

    def sections(self) -> list[Section]:
        """Return the adapters' settings sections: the edges', then the buses'."""
        adapters: list[BusAdapter | EdgeAdapter] = [*self.edges.values(), *self.buses.values()]
        return [adapter.section for adapter in adapters if adapter.section is not None]

    def call(self, hook: str, **kwargs: Any) -> None:
        """Call the hook ``hook`` of every adapter that implements it, one at a time.

        An adapter whose hook raises is set aside (:meth:`set_aside`): the command goes on
        without it, and says so in ``wsbus --help``.

        Args:
            hook: the hook's name (``wsbus_cli_options``, ``wsbus_cli_commands``).
            kwargs: its arguments.

        Raises:
            PluginError: an adapter's hook raised; it is set aside already. What it was
                building (a parser) may hold part of what it added: build it again.
        """
        # pluggy would call them all in one go, and one adapter's exception would end the
        # call for every other: each is called alone, in pluggy's order (last registered
        # first), so the one that failed is known.
        for impl in reversed(getattr(self.hooks.hook, hook).get_hookimpls()):
            try:
                impl.function(*(kwargs[arg] for arg in impl.argnames))
            except Exception as exc:
                self.set_aside(impl.plugin, f"its {hook} hook raised {type(exc).__name__}: {exc}")
                raise PluginError(hook, impl.plugin_name) from exc

    def set_aside(self, adapter: object, why: str) -> None:
        """Move ``adapter`` from the loaded adapters to :attr:`broken`, its hooks unregistered.

        Args:
            adapter: the adapter object (one entry point or several may name it).
            why: what went wrong, for the message.
        """
        if self.hooks.is_registered(adapter):
            self.hooks.unregister(adapter)
        loaded: tuple[tuple[str, dict[str, Any]], ...] = ((EDGES, self.edges), (BUSES, self.buses))
        for group, into in loaded:
            for name in [name for name, value in into.items() if value is adapter]:
                del into[name]
                what, project = self._origins[group, name]
                self.broken[group, name] = (
                    f"{what} failed ({' '.join(why.split())}): it is not loaded; upgrade it, "
                    f"report it to its authors, or remove it (pip uninstall {project})"
                )


def _manager() -> pluggy.PluginManager:
    manager = pluggy.PluginManager("wsbus_cli")
    manager.add_hookspecs(sys.modules[__name__])
    return manager


@functools.cache
def installed() -> Installed:
    """Load every adapter of the installed distributions (once per process).

    An entry point that cannot be loaded, or names an object that is not an adapter, is
    kept in :attr:`Installed.broken` (it is reported when its name is used) instead of
    stopping the command; so is an adapter whose hooks pluggy refuses (a signature that is
    not the hookspec's), one whose settings section is not a :class:`Section`, and a
    second adapter of a name already taken.
    """
    found = Installed()
    groups: tuple[tuple[str, dict[str, Any], type], ...] = (
        (EDGES, found.edges, EdgeAdapter),
        (BUSES, found.buses, BusAdapter),
    )
    for group, into, protocol in groups:
        for entry in metadata.entry_points(group=group):
            dist = f"{entry.dist.name} {entry.dist.version}" if entry.dist else "(unknown)"
            project = entry.dist.name if entry.dist else entry.value.partition(":")[0]
            what = f"the {group} adapter {entry.name!r} ({entry.value}) of {dist}"
            todo = (
                f"reinstall it (pip install --force-reinstall {project}) "
                f"or remove it (pip uninstall {project})"
            )
            try:
                adapter = entry.load()
            except Exception as exc:
                found.broken[group, entry.name] = (
                    f"{what} cannot be loaded ({type(exc).__name__}: {exc}): {todo}"
                )
                continue
            if not isinstance(adapter, protocol):
                found.broken[group, entry.name] = (
                    f"{what} names a {type(adapter).__name__}, which is not a {protocol.__name__} "
                    f"(see docs/adapters.md): {todo}"
                )
                continue
            section = getattr(adapter, "section", None)
            if section is not None and not isinstance(section, Section):
                found.broken[group, entry.name] = (
                    f"{what} has a section that is a {type(section).__name__}, not a "
                    f"wsbus_cli.config.Section (see docs/adapters.md): {todo}"
                )
                continue
            if entry.name in into:
                found.broken[group, entry.name] = (
                    f"{what} has the name of another installed adapter, "
                    f"{found._origins[group, entry.name][0]}: remove one of them "
                    f"(pip uninstall {project})"
                )
                continue
            into[entry.name] = adapter
            found._origins[group, entry.name] = (what, project)
            # One object may be named by several entry points (a bus and an edge): its
            # hooks are registered, and so called, once.
            if found.hooks.is_registered(adapter):
                continue
            try:
                found.hooks.register(adapter, name=f"{group}:{entry.name}")
            except Exception as exc:
                # A hook whose signature is not the hookspec's (pluggy's validation), for one.
                found.set_aside(adapter, f"its hooks cannot be registered ({exc})")
    return found


def _find(group: str, name: str, adapters: dict[str, Any], what: str, kind: str) -> Any:
    adapter = adapters.get(name)
    if adapter is not None:
        return adapter
    broken = installed().broken.get((group, name))
    if broken is not None:
        raise ConfigError(f"{what} {name!r}: {broken}")
    known = ", ".join(sorted(adapters)) or "none"
    raise ConfigError(
        f"{what} {name!r}: no such {kind} is installed (installed: {known}); "
        "an adapter registers under the entry-point group "
        f"{group!r} (docs/adapters.md)"
    )


def find_bus(name: str, what: str = "--bus") -> BusAdapter:
    """Return the installed bus adapter called ``name``.

    Raises:
        ConfigError: there is none (the message lists the installed ones), or its entry
            point is broken (the message names its distribution and what to do).
    """
    adapter: BusAdapter = _find(BUSES, name, installed().buses, what, "bus")
    return adapter


def find_edge(name: str, what: str = "--edge") -> EdgeAdapter:
    """Return the installed edge adapter called ``name``.

    Raises:
        ConfigError: there is none, or its entry point is broken (see :func:`find_bus`).
    """
    adapter: EdgeAdapter = _find(EDGES, name, installed().edges, what, "edge")
    return adapter
