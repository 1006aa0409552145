"""wsbus_cli.supervisor's port picking: ports that no outgoing connection can take."""

from __future__ import annotations

import socket
from pathlib import Path

from wsbus_cli.supervisor import free_port, free_ports

_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")


def test_free_ports_are_distinct_and_can_be_listened_on() -> None:
    ports = free_ports(8)
    assert len(set(ports)) == 8
    listeners = []
    try:
        for port in ports:
            sock = socket.socket()
            listeners.append(sock)
            sock.bind(("127.0.0.1", port))
            sock.listen()
    finally:
        for sock in listeners:
            sock.close()


def test_free_ports_stay_out_of_the_ephemeral_range() -> None:
    # A port in that range can be taken by any process's outgoing connection between the
    # pick and the bind: on two test workers, a nats-server cluster failed to start so.
    try:
        low = int(_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 0
    ports = [free_port() for _ in range(20)]
    if low - 10_000 >= 1_000:
        assert all(10_000 <= port < low for port in ports)
    assert all(0 < port < 65_536 for port in ports)
