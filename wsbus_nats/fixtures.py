"""pytest fixtures that start real nats-server processes (see :mod:`wsbus_nats.servers`).

A pytest plugin (entry point ``pytest11``), loaded wherever wsbus is installed: a test
asks for ``wsbus_nats_server`` or ``wsbus_nats_cluster`` by name. It imports neither
nats-py nor anything heavy. Each fixture starts its servers in the test's own temporary
directory and ends them by their own pids when the test ends, whatever happened.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from .servers import NatsCluster, NatsServer

__all__ = ["wsbus_nats_cluster", "wsbus_nats_server"]


@pytest.fixture
def wsbus_nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    """A started nats-server on 127.0.0.1 (JetStream on, no authentication): ``.url``."""
    server = NatsServer(tmp_path / "nats").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def wsbus_nats_cluster(tmp_path: Path) -> Iterator[NatsCluster]:
    """A started 3-node NATS cluster on 127.0.0.1, JetStream ready: ``.urls``, ``[i]``."""
    cluster = NatsCluster(tmp_path / "nats-cluster", size=3).start()
    try:
        yield cluster
    finally:
        cluster.stop()
