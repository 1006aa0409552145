"""Fixtures for the NATS bus tests: settings pointing at a real nats-server.

The servers themselves come from the ``wsbus_nats_server`` and ``wsbus_nats_cluster``
fixtures (:mod:`wsbus_nats.fixtures`): 127.0.0.1, ``-p -1`` with a ports file in the test's
temporary directory, JetStream on, ended by their own pids.
"""

from __future__ import annotations

import pytest

from wsbus_nats import NatsConfig
from wsbus_nats.servers import NatsServer


@pytest.fixture
def nats_config(wsbus_nats_server: NatsServer) -> NatsConfig:
    """Settings for the test's server: short waits, so that failures show quickly."""
    return NatsConfig(
        servers=(wsbus_nats_server.url,),
        heartbeat=0.5,
        request_timeout=5.0,
        reconnect_wait=0.05,
        reconnect_wait_max=0.5,
    )
