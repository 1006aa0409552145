"""Child processes of the ``wsbus`` command: name server, message bus, services.

``wsbus demo`` starts them, and so do the tests. Each is ``python -m wsbus_cli ...``, started
and ended by its own process id (SIGTERM, then SIGKILL after a bound). Every wait is
bounded. Output is kept, so a failure can show what the child said.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence

from wsbus.errors import ChildFailed

__all__ = ["Child", "ChildFailed", "free_port", "free_ports"]


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port on ``host`` that was free a moment ago (see :func:`free_ports`)."""
    return free_ports(1, host)[0]


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """Return ``count`` distinct TCP ports on ``host`` that were free a moment ago.

    They are picked at random below the system's ephemeral range where it can be read
    (Linux), because a port picked by binding to port 0 comes from that range, which is
    also where every outgoing connection takes its local port: on a busy machine (tests on
    several workers) another process's connection could take it between this call and the
    bind that needs it. Below the range only a deliberate bind can take it.

    Raises:
        OSError: no free port was found.
    """
    sockets: list[socket.socket] = []
    try:
        # Held open together, so that the count are distinct; free again when this returns.
        while len(sockets) < count:
            sockets.append(_bound_socket(host))
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


#: Where :func:`free_ports` looks first: below the ephemeral range, above the ports that
#: well-known services and most configurations use.
_QUIET_FLOOR = 10_000
_EPHEMERAL_RANGE = "/proc/sys/net/ipv4/ip_local_port_range"
# Not the module's `random`: Hypothesis seeds that one the same way in every test worker.
_random = random.SystemRandom()


def _bound_socket(host: str) -> socket.socket:
    try:
        with open(_EPHEMERAL_RANGE) as file:
            ceiling = int(file.read().split()[0])
    except (OSError, ValueError, IndexError):
        ceiling = 0
    if ceiling - _QUIET_FLOOR >= 1_000:
        for _ in range(50):
            sock = socket.socket()
            try:
                sock.bind((host, _random.randrange(_QUIET_FLOOR, ceiling)))
            except OSError:
                sock.close()
                continue
            return sock
    sock = socket.socket()
    try:
        sock.bind((host, 0))
    except BaseException:
        sock.close()
        raise
    return sock


class Child:
    """A ``python -m wsbus_cli`` child process.

    Args:
        args: the arguments after ``python -m wsbus_cli``.
        ready: a word the child prints once it is serving.
        timeout: seconds to wait for ``ready``.
        env: variables to add to (or, with a None value, remove from) this process's
            environment for the child. Secrets go here, never in ``args``: any local user
            can read a command line (``ps``), only the same user a process's environment.
        cwd: the child's working directory (this process's by default).
        command: what runs ``args``: ``python -m wsbus_cli`` by default; the ``wsbus`` script
            to test it as installed.

    Raises:
        ChildFailed: the child exited, or did not get ready in time (its output is in the
            message).
    """

    def __init__(
        self,
        args: Sequence[str],
        *,
        ready: str = "ready",
        timeout: float = 20.0,
        env: Mapping[str, str | None] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        command: Sequence[str] | None = None,
    ):
        self.args = list(args)
        self.output: list[str] = []
        self._ready = threading.Event()
        environment = {**os.environ, "PYTHONUNBUFFERED": "1"}
        for name, value in (env or {}).items():
            if value is None:
                environment.pop(name, None)
            else:
                environment[name] = value
        self.process = subprocess.Popen(
            [*(command or (sys.executable, "-m", "wsbus_cli")), *self.args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            env=environment,
            cwd=cwd,
        )
        self._reader = threading.Thread(target=self._read, args=(ready,), daemon=True)
        self._reader.start()
        if not self._ready.wait(timeout):
            self.stop()
            raise ChildFailed(
                f"wsbus {' '.join(self.args)} did not start:\n{self.text}", self.args, self.text
            )
        if self.process.poll() is not None:
            self._release()
            raise ChildFailed(
                f"wsbus {' '.join(self.args)} exited:\n{self.text}", self.args, self.text
            )

    @property
    def pid(self) -> int:
        """The child's process id."""
        return self.process.pid

    @property
    def text(self) -> str:
        """What the child printed so far."""
        return "".join(self.output)

    def _read(self, ready: str) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.output.append(line)
            if ready in line:
                self._ready.set()
        self._ready.set()  # exited: wake the waiter, which checks poll()

    def kill(self) -> None:
        """End the child at once (SIGKILL), as a crash would."""
        if self.process.poll() is None:
            os.kill(self.pid, signal.SIGKILL)
            self.process.wait(10)
        self._release()

    def _release(self) -> None:
        """Once the child has exited: read the rest of its output and close the pipe."""
        # The reader ends at the pipe's end; an unclosed pipe would be a ResourceWarning
        # wherever the garbage collector happens to find it.
        self._reader.join(2)
        if self.process.stdout is not None:
            self.process.stdout.close()

    def stop(self, timeout: float = 10.0) -> int:
        """End the child gracefully (SIGTERM; SIGKILL after ``timeout``); return its status."""
        if self.process.poll() is None:
            os.kill(self.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.process.wait(10)
        self._release()
        return self.process.returncode

    def wait_output(self, text: str, timeout: float = 10.0) -> None:
        """Wait until the child has printed ``text``.

        Raises:
            TimeoutError: it did not within ``timeout``.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.text:
                return
            time.sleep(0.02)
        raise TimeoutError(f"{text!r} not printed by wsbus {' '.join(self.args)}:\n{self.text}")
