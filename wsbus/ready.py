"""Deep health: is this gateway ready for clients? Its edge, its bus round trip, its services.

``/healthz`` says the process is up and not shutting down: cheap, and a load balancer may
ask it often. ``/readyz`` says more, the answer this module works out: a probe goes round
the bus and back to the gateway within a deadline (:meth:`wsbus.Gateway.probe`), so a
gateway whose bus still takes its publishes but no longer delivers to it (deaf to its
broker, the failure a plain health check misses) is *not ready*; the services on the bus
are listed, and those named in ``ready_services`` must be there.

A probe costs a message on the bus, so however often ``/readyz`` is asked (a hostile client
may ask it thousands of times a second), probes go at most one at a time: a check asked for
while one is under way waits for that one, and a report younger than ``reuse`` seconds is
given again. Nothing here runs per message.
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Final, Literal

import msgspec

from .bus import Probes
from .errors import BusUnavailable

if TYPE_CHECKING:
    from .gateway import Gateway

__all__ = ["BusPart", "EdgePart", "Readiness", "ReadyReport"]

log = logging.getLogger("wsbus.ready")

IDLE_STOP: Final = 60.0
"""Seconds without a ``/readyz`` request after which the background probes of
:meth:`Readiness.current` stop (they start again with the next request)."""

BusStatus = Literal["ok", "unavailable", "timeout", "not_probed", "checking"]


class EdgePart(msgspec.Struct, frozen=True, kw_only=True):
    """The edge's part of a readiness report.

    Attributes:
        status: ``ok``, or ``closing`` (shutting down: no new clients).
        connections: connections open now.
    """

    status: Literal["ok", "closing"]
    connections: int


class BusPart(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """The bus's part of a readiness report.

    Attributes:
        status: ``ok`` (the probe came back in time), ``unavailable`` (the bus refused it),
            ``timeout`` (it did not come back within the deadline), ``not_probed`` (the bus
            cannot be probed: its own availability is reported), ``checking`` (the first
            probe is under way).
        publish_ms: milliseconds until the bus took the probe.
        round_trip_ms: milliseconds until it came back.
        detail: what went wrong, in words.
        age_ms: how old this part is: milliseconds since the probe ended.
    """

    status: BusStatus
    publish_ms: float | None = None
    round_trip_ms: float | None = None
    detail: str | None = None
    age_ms: float = 0.0


class ReadyReport(msgspec.Struct, frozen=True, kw_only=True):
    """What ``/readyz`` answers, as JSON.

    Attributes:
        ready: the edge is open, the bus probe came back, and every service in
            ``ready_services`` has a live instance.
        edge: the edge's part.
        bus: the bus's part.
        services: each service on the bus and its live instances; None when the bus
            cannot list them.
        missing: services named in ``ready_services`` that are not on the bus.
    """

    ready: bool
    edge: EdgePart
    bus: BusPart
    services: dict[str, int] | None
    missing: list[str]

    def http(self, *, full: bool = True) -> tuple[http.HTTPStatus, bytes]:
        """The status (200 or 503) and JSON body of this report.

        Args:
            full: the whole report. Otherwise (a client not in ``metrics_from``) each
                part's status and figures, without what names the deployment: no
                ``detail`` (it may hold addresses), no service names.
        """
        code = http.HTTPStatus.OK if self.ready else http.HTTPStatus.SERVICE_UNAVAILABLE
        report = self
        if not full:
            report = msgspec.structs.replace(
                self,
                bus=msgspec.structs.replace(self.bus, detail=None),
                services=None,
                missing=[],
            )
        return code, msgspec.json.encode(report)


class _Probed(msgspec.Struct, frozen=True):
    """One finished check of the bus (its part, its services), and when it ended."""

    bus: BusPart
    services: dict[str, int] | None
    ended: float


class Readiness:
    """Works out :class:`ReadyReport` for one gateway, probing its bus at most one at a time.

    Args:
        gateway: the gateway (:class:`wsbus.Gateway`).
        timeout: seconds the probe may take to come back before the bus counts as deaf.
        reuse: seconds a finished check is given again instead of probing anew.
        services: services that must have a live instance for the gateway to be ready.
        observe: called with (publish seconds, round-trip seconds) of each probe that came
            back (the metrics' latency histograms).
        clock: monotonic seconds (tests pass their own).
    """

    def __init__(
        self,
        gateway: Gateway,
        *,
        timeout: float = 2.0,
        reuse: float = 1.0,
        services: Sequence[str] = (),
        observe: Callable[[float, float], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.gateway = gateway
        self.timeout = timeout
        self.reuse = reuse
        self.required = tuple(services)
        self.observe = observe
        self._clock = clock
        self._last: _Probed | None = None
        self._running: asyncio.Task[_Probed] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._asked = 0.0
        self._healthy = True

    async def check(self, closing: bool = False) -> ReadyReport:
        """Return the report, probing the bus unless a fresh enough check exists.

        Waits at most about twice ``timeout`` seconds (for the probe, then for the list of
        services, each bounded by it). ``closing``: the edge is shutting down.
        """
        last = self._last
        if last is None or self._clock() - last.ended >= self.reuse:
            last = await asyncio.shield(self._start())
        return self._report(last, closing)

    def current(self, closing: bool = False) -> ReadyReport:
        """Return the latest report now, without waiting (for an edge that cannot wait).

        Asking starts probes in the background, one every ``reuse`` seconds, until nobody
        has asked for :data:`IDLE_STOP` seconds; so the report is at most ``reuse`` plus
        ``timeout`` seconds old. Before the first probe ends, the bus part is ``checking``
        and the gateway is not ready.
        """
        self._asked = self._clock()
        if self._watcher is None or self._watcher.done():
            self._watcher = asyncio.get_running_loop().create_task(
                self._watch(), name="wsbus-readiness"
            )
        last = self._last
        if last is None or self._clock() - last.ended > self.reuse + self.timeout:
            # None yet, or too old to go by (nobody asked for a while, and the background
            # probes had stopped): not ready until the check just started ends.
            last = _Probed(
                BusPart(status="checking", detail="a check of the bus is under way"),
                None,
                self._clock(),
            )
        return self._report(last, closing)

    async def close(self) -> None:
        """Stop the background probes and any probe under way."""
        for task in (self._watcher, self._running):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    def _start(self) -> asyncio.Task[_Probed]:
        """The probe under way, or a new one: never two at a time."""
        running = self._running
        if running is None or running.done():
            running = self._running = asyncio.get_running_loop().create_task(
                self._probe(), name="wsbus-probe"
            )
        return running

    async def _watch(self) -> None:
        while self._clock() - self._asked < IDLE_STOP:
            await self._start()
            await asyncio.sleep(self.reuse)

    async def _probe(self) -> _Probed:
        gateway = self.gateway
        part: BusPart
        if not isinstance(gateway.bus, Probes):
            # A bus that cannot be probed: its own word on whether it is available.
            available = gateway.bus_available
            part = BusPart(
                status="unavailable" if available is False else "not_probed",
                detail=f"the bus {type(gateway.bus).__name__} cannot be probed",
            )
            return await self._services(part)
        try:
            published, round_trip = await gateway.probe(self.timeout)
        except TimeoutError:
            part = BusPart(
                status="timeout",
                detail=f"the probe did not come back round the bus within {self.timeout} s",
            )
        except BusUnavailable as exc:
            part = BusPart(status="unavailable", detail=str(exc))
        except Exception as exc:
            # Whatever else a bus raises (an older Pyro message bus without ``probe``
            # answers with AttributeError): not ready, and said, never a 500 or a dead
            # background check.
            part = BusPart(status="unavailable", detail=f"the probe failed: {exc!r}")
        else:
            part = BusPart(
                status="ok",
                publish_ms=round(published * 1000, 3),
                round_trip_ms=round(round_trip * 1000, 3),
            )
            if self.observe is not None:
                self.observe(published, round_trip)
        return await self._services(part)

    async def _services(self, part: BusPart) -> _Probed:
        """Finish a check: list the services (when the bus answered), keep the result."""
        gateway = self.gateway
        services: dict[str, int] | None = None
        if part.status in ("ok", "not_probed"):
            try:
                async with asyncio.timeout(self.timeout):
                    services = await gateway.live_services()
            except Exception as exc:  # TimeoutError, BusUnavailable, or a bus's bug
                part = BusPart(
                    status="unavailable",
                    publish_ms=part.publish_ms,
                    round_trip_ms=part.round_trip_ms,
                    detail=f"the bus could not list its services: {exc!r}",
                )
        healthy = part.status in ("ok", "not_probed")
        if healthy != self._healthy and not gateway.closing:
            # (A gateway shutting down refuses its own probe: nothing to warn about.)
            # Said when it changes, not at every probe: an outage is one warning.
            self._healthy = healthy
            if healthy:
                log.warning("gateway %s hears its bus again", gateway.node)
            else:
                log.warning("gateway %s is not ready: %s", gateway.node, part.detail)
        probed = _Probed(part, services, self._clock())
        self._last = probed
        return probed

    def _report(self, probed: _Probed, closing: bool) -> ReadyReport:
        gateway = self.gateway
        closing = closing or gateway.closing
        edge = EdgePart(status="closing" if closing else "ok", connections=gateway.open_connections)
        services = probed.services
        missing = [name for name in self.required if not (services or {}).get(name)]
        age = round((self._clock() - probed.ended) * 1000, 3)
        bus = msgspec.structs.replace(probed.bus, age_ms=max(age, 0.0))
        ready = not closing and bus.status in ("ok", "not_probed") and not missing
        return ReadyReport(ready=ready, edge=edge, bus=bus, services=services, missing=missing)
