"""The Pyro5 bus for wsbus: name server, message bus, gateway adapter, service processes.

Importing this package costs nothing: Pyro5 is imported when a name is first used, and a
missing extra fails with an error that says ``pip install 'wsbus[pyro]'``.

- :class:`PyroBus`: the gateway's :class:`wsbus.Bus` on Pyro.
- :class:`PyroConfig`: the settings every wsbus Pyro process shares.
- :func:`run_bus`, :func:`run_name_server`: the message bus and name server processes.
- :class:`ServiceHost`, :func:`run_service`: a :class:`wsbus.Service` as a Pyro process.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from wsbus.extras import lazy_exports

if TYPE_CHECKING:
    from .bus import PyroBus
    from .config import PyroConfig
    from .messagebus import MessageBus
    from .servers import run_bus, run_name_server
    from .service import ServiceHost, load_service, run_service

__all__ = [
    "MessageBus",
    "PyroBus",
    "PyroConfig",
    "ServiceHost",
    "load_service",
    "run_bus",
    "run_name_server",
    "run_service",
]

_WHERE = {
    "MessageBus": "messagebus",
    "PyroBus": "bus",
    "PyroConfig": "config",
    "ServiceHost": "service",
    "load_service": "service",
    "run_bus": "servers",
    "run_name_server": "servers",
    "run_service": "service",
}


__getattr__ = lazy_exports(__name__, _WHERE, "Pyro5", "pyro")
