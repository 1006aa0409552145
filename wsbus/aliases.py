"""Aliases unique across gateways: one gateway's claims on its bus's alias table.

On a bus that spans gateways (:class:`~wsbus.bus.ClaimsAliases`) a gateway claims an alias on
the bus before its registry gives it to a connection, and releases it when the alias is
cleared or replaced or the connection ends. :class:`AliasClaims` does that for one gateway:
it carries out the alias requests :class:`~wsbus.outbound.Outbound` checked and left in
``alias_requests``, and answers them through it.

Order: the requests for one connection are carried out one after another, in the order they
came (a clear never overtakes the set before it, and a connection's release at its end comes
after both); those of different connections run at once. Everything else the bus delivers
(messages, other control requests) goes on meanwhile, in its own order.

A release the bus cannot make is logged and counted (``Stats.alias_releases_failed``) and
tried again: a live connection's before its next alias request, a closed connection's
before any claim. The bus frees every claim of a gateway it knows to be dead.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from typing import Final

from . import control
from .bus import ClaimsAliases
from .envelope import ConnId
from .errors import AliasTaken, BusUnavailable, InvalidName, UnknownConnection
from .hooks import _FailureLog
from .outbound import AliasChange, Outbound
from .registry import ClientRegistry
from .stats import Counters

__all__ = ["MAX_CLAIMS", "RELEASE_BACKLOG", "AliasClaims"]

log = logging.getLogger("wsbus.gateway")

MAX_CLAIMS: Final = 100
"""Aliases one request claims on the bus, at most, before it is answered ``alias_taken``
(under the suffix policy: ``sam``, ``sam2``, ... ``sam100``)."""

RELEASE_BACKLOG: Final = 10_000
"""Releases the bus could not make that are kept to try again; beyond, the oldest is
given up (the bus frees it when it learns this gateway is gone)."""

LOG_INTERVAL: Final = 60.0
"""Seconds between two warnings about releases the bus could not make."""

_UNAVAILABLE: Final = "the bus's alias table cannot be reached: nothing was set; retry later"

# A connection's queue holds its alias requests and, last, the release at its end.
_Item = AliasChange | str


class AliasClaims:
    """Claims and releases aliases on the bus for one gateway, in order per connection.

    The gateway owns it: it calls :meth:`take` after the bus delivered (when Outbound left
    alias requests), :meth:`release` when a connection with an alias ends, :meth:`claim` for
    an alias authentication gave, and :meth:`close` at shutdown.

    Args:
        bus: the gateway's bus.
        registry: the gateway's registry, set only with aliases won on the bus.
        outbound: where the requests wait and through which they are answered.
        counters: the gateway's counters.
        post: sends what Outbound left in ``to_bus`` (the gateway's reporter).
        wall_clock: seconds since the epoch, for the answers' ``created``.
        monotonic: a monotonic clock, for the rate of warnings.
    """

    def __init__(
        self,
        bus: ClaimsAliases,
        registry: ClientRegistry,
        outbound: Outbound,
        counters: Counters,
        post: Callable[[], None],
        wall_clock: Callable[[], float],
        monotonic: Callable[[], float],
    ) -> None:
        self._bus = bus
        self._registry = registry
        self._outbound = outbound
        self._counters = counters
        self._post = post
        self._wall_clock = wall_clock
        self._monotonic = monotonic
        self._queues: dict[ConnId, deque[_Item]] = {}
        self._tasks: dict[ConnId, asyncio.Task[None]] = {}
        # (alias, connection) releases the bus could not make, oldest first.
        self._unreleased: dict[tuple[str, ConnId], None] = {}
        self._log = _FailureLog(LOG_INTERVAL)
        self._closed = False

    # -- what the gateway calls ------------------------------------------------------------

    def take(self) -> None:
        """Take the alias requests Outbound left, and start carrying them out."""
        requests = self._outbound.alias_requests
        while requests:
            change = requests.popleft()
            self._queue(change.conn_id, change)

    def release(self, conn_id: ConnId, alias: str) -> None:
        """Release the alias a connection had when it ended, after its queued requests."""
        self._queue(conn_id, alias)

    async def claim(self, conn_id: ConnId, alias: str) -> str:
        """Claim an alias on the bus for a connection; return the alias won.

        ``alias`` itself, or under the suffix policy the first suffixed form the bus
        gives. The registry is not changed.

        Raises:
            AliasTaken: another connection holds it (each suffix tried, too).
            InvalidName: the alias, or a suffixed form, does not match the name pattern.
            BusUnavailable: the alias table cannot be reached; nothing was claimed.
        """
        await self._retry_releases(lambda owner: owner not in self._registry)
        for tries, candidate in enumerate(self._registry.alias_candidates(conn_id, alias)):
            if tries == MAX_CLAIMS:
                break
            # A release of it tried again later would undo this claim.
            self._unreleased.pop((candidate, conn_id), None)
            if await self._claim(candidate, conn_id):
                return candidate
        raise AliasTaken(alias)

    async def close(self, within: float) -> None:
        """Wait up to ``within`` seconds for the queued requests; cancel the rest.

        A request cancelled, or one that comes later, is answered ``unavailable``; a release
        that comes later is left to the bus (it frees a closed gateway's claims).
        """
        self._closed = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while self._tasks:
            tasks = list(self._tasks.values())
            left = deadline - loop.time()
            if left <= 0:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                break
            await asyncio.wait(tasks, timeout=left)

    @property
    def pending(self) -> int:
        """Alias requests and releases waiting or under way."""
        return sum(len(queue) for queue in self._queues.values())

    # -- carrying them out -----------------------------------------------------------------

    def _queue(self, conn_id: ConnId, item: _Item) -> None:
        if self._closed:
            # Shutting down: the bus closes next, and frees this gateway's claims then.
            if not isinstance(item, str):
                self._answer(item, _refused("unavailable", "the gateway is shutting down"))
            return
        queue = self._queues.get(conn_id)
        if queue is None:
            queue = self._queues[conn_id] = deque()
            self._tasks[conn_id] = asyncio.create_task(
                self._run(conn_id, queue), name=f"wsbus-aliases-{conn_id}"
            )
        queue.append(item)

    async def _run(self, conn_id: ConnId, queue: deque[_Item]) -> None:
        """Carry out one connection's alias requests in order; end when none is left."""
        try:
            while queue:
                item = queue[0]
                if isinstance(item, str):
                    await self._release(item, conn_id)
                else:
                    await self._change(item)
                queue.popleft()
        except asyncio.CancelledError:
            for item in queue:
                if not isinstance(item, str):
                    self._answer(item, _refused("unavailable", "the gateway is shutting down"))
            raise
        except Exception:
            log.exception("carrying out alias requests for %s failed: a bug in wsbus", conn_id)
            for item in queue:
                if not isinstance(item, str):
                    self._answer(item, _refused("unavailable", "the gateway failed; retry"))
        finally:
            del self._queues[conn_id]
            del self._tasks[conn_id]

    async def _change(self, change: AliasChange) -> None:
        """Set or clear one connection's alias, claiming on the bus first; answer it."""
        registry = self._registry
        conn_id = change.conn_id
        # This connection's own releases, in its own queue: no claim of its races them.
        await self._retry_releases(lambda owner: owner == conn_id)
        if conn_id not in registry:
            self._answer(change, _refused("unknown_connection", str(UnknownConnection(conn_id))))
            return
        old = registry.info(conn_id).alias
        if change.alias is None:
            registry.clear_alias(conn_id)
            self._answer(change, control.Result(True))
            if old is not None:
                await self._release(old, conn_id)
            return
        try:
            alias = await self.claim(conn_id, change.alias)
        except AliasTaken as exc:
            self._answer(change, _refused("alias_taken", str(exc)))
            return
        except InvalidName as exc:
            self._answer(change, _refused("invalid_name", str(exc)))
            return
        except BusUnavailable:
            self._answer(change, _refused("unavailable", _UNAVAILABLE))
            return
        if conn_id not in registry:
            # The connection closed while the bus answered: it will not use the alias.
            await self._release(alias, conn_id)
            self._answer(change, _refused("unknown_connection", str(UnknownConnection(conn_id))))
            return
        try:
            registry.set_alias(conn_id, alias, exact=True)
        except AliasTaken as exc:
            # Another connection here has it without a claim: only a bug gets here.
            log.error("alias %r is set here but was free on the bus; refused", alias)
            await self._release(alias, conn_id)
            self._answer(change, _refused("alias_taken", str(exc)))
            return
        self._answer(change, control.Result(True, alias))
        if old is not None and old != alias:
            await self._release(old, conn_id)

    def _answer(self, change: AliasChange, result: control.Result) -> None:
        self._outbound.answer(change.request, result, self._wall_clock())
        self._post()

    # -- the bus ---------------------------------------------------------------------------

    async def _claim(self, alias: str, conn_id: ConnId) -> bool:
        try:
            return await self._bus.claim_alias(alias, conn_id) is True
        except BusUnavailable:
            raise
        except Exception as exc:
            log.error(
                "claiming alias %r failed with %r: a bug in the bus adapter %s",
                alias,
                exc,
                type(self._bus).__name__,
                exc_info=exc,
            )
            raise BusUnavailable(f"the bus could not claim alias {alias!r}") from exc

    async def _release(self, alias: str, conn_id: ConnId) -> None:
        """Release on the bus; on failure, count, log (rate-limited) and keep it to retry."""
        try:
            await self._bus.release_alias(alias, conn_id)
        except Exception as exc:
            self._counters.alias_releases_failed += 1
            unreleased = self._unreleased
            unreleased[(alias, conn_id)] = None
            if len(unreleased) > RELEASE_BACKLOG:
                del unreleased[next(iter(unreleased))]
            count = self._log.admit("release", self._monotonic())
            if count is not None:
                log.warning(
                    "could not release alias %r of %s on the bus (%s); it is tried again "
                    "before the next claim, and the bus frees it when it learns this gateway "
                    "is gone (%d such failures since the last warning; "
                    "Stats.alias_releases_failed counts them all)",
                    alias,
                    conn_id,
                    exc,
                    max(count, 1),
                )

    async def _retry_releases(self, whose: Callable[[ConnId], bool]) -> None:
        """Try again the releases the bus could not make, of the connections ``whose`` picks.

        Stops at the first that fails again: the bus is still out of reach.
        """
        for alias, conn_id in [key for key in self._unreleased if whose(key[1])]:
            if (alias, conn_id) not in self._unreleased:
                continue  # another task released it meanwhile
            try:
                await self._bus.release_alias(alias, conn_id)
            except Exception:
                return
            self._unreleased.pop((alias, conn_id), None)


def _refused(code: str, message: str) -> control.Result:
    return control.Result(False, None, code, message)
