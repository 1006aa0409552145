"""The NATS bus for wsbus: gateways and service instances on a NATS cluster.

Importing this package costs nothing: nats-py is imported when a name is first used, and a
missing extra fails with an error that says ``pip install 'wsbus[nats]'``.

- :class:`NatsBus`: the gateway's :class:`wsbus.Bus` on NATS.
- :class:`NatsConfig`: the settings every wsbus NATS process shares.
- :class:`ServiceHost`, :func:`run_service`: a :class:`wsbus.Service` instance on NATS.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from wsbus.extras import lazy_exports

if TYPE_CHECKING:
    from .bus import NatsBus
    from .config import NatsConfig
    from .service import ServiceHost, load_service, run_service

__all__ = ["NatsBus", "NatsConfig", "ServiceHost", "load_service", "run_service"]

_WHERE = {
    "NatsBus": "bus",
    "NatsConfig": "config",
    "ServiceHost": "service",
    "load_service": "service",
    "run_service": "service",
}


__getattr__ = lazy_exports(__name__, _WHERE, "nats", "nats")
