"""One process's connection to NATS, as wsbus uses it: :class:`Link`.

A link connects with :class:`~wsbus_nats.config.NatsConfig`'s options (reconnect for ever
with backoff and jitter, no publish buffer while disconnected), counts and logs every
disconnect, reconnect, slow consumer, permission refusal and error (:class:`LinkCounters`),
puts explicit pending limits on every subscription, and runs its own request/answer inbox
(one subscription, with those limits) for the acknowledgements wsbus waits for.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final

import nats
import nats.errors
from nats.aio.client import Client, Server
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from wsbus.errors import BusUnavailable

from .config import NatsConfig, redact_url

__all__ = ["NO_RESPONDERS", "Link", "LinkCounters", "RateLimitedLog", "quietly"]

log = logging.getLogger("wsbus.nats")

NO_RESPONDERS: Final = b"\x00no-responders"
"""What an acknowledgement future gets when NATS says nobody subscribes to the subject."""

_STATUS_HEADER: Final = "Status"
_NO_RESPONDERS_STATUS: Final = "503"
_PERMISSION_TEXT: Final = "permissions violation"


class LinkCounters:
    """What happened on a link, counted from its start (read them; never reset)."""

    __slots__ = (
        "disconnects",
        "errors",
        "permission_errors",
        "reconnects",
        "refused",
        "sender_mismatches",
        "slow_consumers",
        "too_large",
    )

    def __init__(self) -> None:
        self.disconnects = 0
        """The connection to NATS broke."""
        self.reconnects = 0
        """The connection was made again."""
        self.slow_consumers = 0
        """Messages NATS dropped because a subscription of this process was full."""
        self.permission_errors = 0
        """Publishes or subscriptions the server refused (permissions violation)."""
        self.errors = 0
        """Other errors the client reported."""
        self.sender_mismatches = 0
        """Envelopes dropped because their sender is not the one their subject names."""
        self.too_large = 0
        """Envelopes refused because they exceed the server's max_payload."""
        self.refused = 0
        """Envelopes refused because the link was down."""

    def as_dict(self) -> dict[str, int]:
        """Return the counters by name."""
        return {name: getattr(self, name) for name in self.__slots__}


class RateLimitedLog:
    """Logs an event once, then at most once per ``interval`` seconds with a count.

    One kind of event flooding (a slow consumer dropping thousands of messages) then costs
    one line a minute, saying how many were folded into it, never a line per message.
    """

    def __init__(self, logger: logging.Logger, interval: float = 60.0) -> None:
        self._log = logger
        self._interval = interval
        self._last: dict[str, float] = {}
        self._folded: dict[str, int] = {}

    def warning(self, key: str, message: str, *args: object) -> None:
        """Log ``message`` at WARNING unless ``key`` was logged within the interval."""
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self._interval:
            self._folded[key] = self._folded.get(key, 0) + 1
            return
        self._last[key] = now
        folded = self._folded.pop(key, 0)
        if folded:
            message += f" ({folded} more like it since the last warning)"
        self._log.warning(message, *args)


class Link:
    """A NATS connection with wsbus's options, counters and acknowledgement inbox.

    Args:
        config: the NATS settings.
        name: the connection's name in NATS monitoring (``config.name`` wins if set).
        on_reconnected: called on the loop after every reconnection.
        on_disconnected: called on the loop when the connection breaks.
        on_slow_consumer: called on the loop with the subscription NATS dropped
            messages from.
        inbox_prefix: where every answer to this process comes (its own, see
            :meth:`wsbus_nats.subjects.Subjects.inbox`), nats-py's ``_INBOX`` by default.
    """

    def __init__(
        self,
        config: NatsConfig,
        name: str,
        *,
        on_reconnected: Callable[[], None] | None = None,
        on_disconnected: Callable[[], None] | None = None,
        on_slow_consumer: Callable[[Subscription], None] | None = None,
        inbox_prefix: str = "_INBOX",
    ) -> None:
        self.config = config
        self.inbox_prefix = inbox_prefix
        self.name = config.name or name
        self.counters = LinkCounters()
        self.nc = Client()
        self._on_reconnected = on_reconnected
        self._on_disconnected = on_disconnected
        self._on_slow_consumer = on_slow_consumer
        self._warn = RateLimitedLog(log)
        self._acks: dict[str, asyncio.Future[bytes]] = {}
        self._ack_prefix = ""
        self._tokens = itertools.count(1)
        self._server = ""
        self._lost_server = ""
        self._closing = False

    # -- connecting ----------------------------------------------------------------------

    async def connect(self) -> None:
        """Connect, and subscribe the acknowledgement inbox.

        Raises:
            BusUnavailable: no server in ``config.servers`` could be reached (or it
                refused this client); the message names them.
        """
        config = self.config
        try:
            await self.nc.connect(
                **config.connect_options(),
                name=self.name,
                inbox_prefix=self.inbox_prefix,
                error_cb=self._error,
                disconnected_cb=self._disconnected,
                reconnected_cb=self._reconnected,
                closed_cb=self._closed,
                reconnect_to_server_handler=self._next_server,
            )
        except Exception as exc:
            failed = self.nc
            self.nc = Client()
            self._closing = True  # its callbacks have nothing more to say
            try:
                await quietly(failed.close())
            finally:
                self._closing = False
            raise BusUnavailable(
                f"no NATS server could be reached at "
                f"{', '.join(map(redact_url, config.servers))} ({config.scrub(repr(exc))}); "
                "check that one runs there (nats-server -js), and the credentials"
            ) from None
        # Connected once: from now on reconnect for ever (see NatsConfig.connect_options).
        self.nc.options["max_reconnect_attempts"] = -1
        self._server = self._connected_to()
        self._ack_prefix = self.nc.new_inbox() + "."
        await self.subscribe(self._ack_prefix + "*", self._ack)

    async def close(self) -> None:
        """Close the connection (pending acknowledgements fail). Idempotent."""
        self._closing = True
        for future in self._acks.values():
            if not future.done():
                future.set_exception(BusUnavailable("the NATS connection was closed"))
        self._acks.clear()
        if not self.nc.is_closed:
            await quietly(self.nc.close())

    @property
    def connected(self) -> bool:
        """True while the connection to NATS is up."""
        return self.nc.is_connected

    @property
    def max_payload(self) -> int:
        """The largest message the server takes, in bytes (headers and subject included)."""
        return self.nc.max_payload

    async def subscribe(
        self, subject: str, cb: Callable[[Msg], Awaitable[None]], queue: str = ""
    ) -> Subscription:
        """Subscribe with the configured pending limits (never nats-py's defaults)."""
        return await self.nc.subscribe(
            subject,
            queue=queue,
            cb=cb,
            pending_msgs_limit=self.config.pending_msgs,
            pending_bytes_limit=self.config.pending_bytes,
        )

    # -- publishing ----------------------------------------------------------------------

    async def publish(
        self, subject: str, payload: bytes, reply: str = "", headers: dict[str, str] | None = None
    ) -> None:
        """Publish once; refuse when disconnected (no silent buffer).

        Raises:
            BusUnavailable: the link is down (whole bus).
        """
        try:
            await self.nc.publish(subject, payload, reply=reply, headers=headers)
        except nats.errors.Error as exc:
            raise self.refusal(exc, len(payload)) from None

    def refusal(self, exc: nats.errors.Error, size: int) -> BusUnavailable:
        """Count a publish nats-py refused; return the BusUnavailable that says why."""
        if isinstance(exc, nats.errors.MaxPayloadError):
            self.counters.too_large += 1
            return BusUnavailable(
                f"{size} bytes is more than the NATS server takes in one message "
                f"(max_payload {self.max_payload})",
                whole_bus=False,
            )
        self.counters.refused += 1
        return BusUnavailable(f"the connection to NATS is down ({exc!r})")

    def new_ack(self) -> tuple[str, asyncio.Future[bytes]]:
        """Return a reply subject and the future its first answer resolves.

        The future gets the answer's payload, or :data:`NO_RESPONDERS`. The caller bounds
        the wait and calls :meth:`drop_ack` when it gives up.
        """
        token = f"{next(self._tokens):x}"
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._acks[token] = future
        return self._ack_prefix + token, future

    def drop_ack(self, reply: str) -> None:
        """Forget an acknowledgement nobody waits for any more."""
        self._acks.pop(reply[len(self._ack_prefix) :], None)

    async def _ack(self, msg: Msg) -> None:
        future = self._acks.pop(msg.subject[len(self._ack_prefix) :], None)
        if future is None or future.done():
            return
        headers = msg.headers
        if headers and headers.get(_STATUS_HEADER) == _NO_RESPONDERS_STATUS and not msg.data:
            future.set_result(NO_RESPONDERS)
        else:
            future.set_result(msg.data)

    # -- nats-py's callbacks -------------------------------------------------------------

    def _next_server(self, servers: list[Server], info: dict[str, Any]) -> tuple[Server, float]:
        """Pick the server tried least, the one just lost last; wait with backoff."""
        lost = self._lost_server
        server = min(servers, key=lambda s: (s.reconnects, s.uri.netloc == lost))
        return server, self.config.backoff(server.reconnects)

    async def _error(self, exc: Exception) -> None:
        counters = self.counters
        if isinstance(exc, nats.errors.SlowConsumerError):
            counters.slow_consumers += 1
            self._warn.warning(
                "slow consumer",
                "NATS dropped a message for %s on subject %s: the subscription holds its "
                "pending limit (%d messages or %d bytes) unread; this process reads too "
                "slowly (NatsConfig.pending_msgs, pending_bytes)",
                self.name,
                exc.subject,
                self.config.pending_msgs,
                self.config.pending_bytes,
            )
            if self._on_slow_consumer is not None:
                self._on_slow_consumer(exc.sub)
            return
        text = str(exc)
        if _PERMISSION_TEXT in text.lower():
            counters.permission_errors += 1
            self._warn.warning(
                "permission",
                "the NATS server refused %s: %s (check the user's permissions: wsbus nats-config)",
                self.name,
                text,
            )
            return
        counters.errors += 1
        if not self._closing:
            self._warn.warning(
                f"error {type(exc).__name__}",
                "NATS (%s): %s",
                self.name,
                self.config.scrub(repr(exc)),
            )

    async def _disconnected(self) -> None:
        if self._closing:
            return
        counters = self.counters
        counters.disconnects += 1
        url = self._lost_server = self._server
        log.warning(
            "%s lost its connection to NATS (%s); reconnecting (disconnect %d); envelopes "
            "are refused meanwhile",
            self.name,
            redact_url(url or "?"),
            counters.disconnects,
        )
        for token, future in list(self._acks.items()):
            # An answer in flight is lost with the connection: do not wait out the timeout.
            if not future.done():
                future.set_exception(BusUnavailable("the connection to NATS broke"))
            self._acks.pop(token, None)
        if self._on_disconnected is not None:
            self._on_disconnected()

    async def _reconnected(self) -> None:
        counters = self.counters
        counters.reconnects += 1
        url = self._server = self._connected_to()
        log.warning(
            "%s reconnected to NATS at %s (reconnect %d)",
            self.name,
            redact_url(url),
            counters.reconnects,
        )
        if self._on_reconnected is not None:
            self._on_reconnected()

    def _connected_to(self) -> str:
        url = self.nc.connected_url
        return url.netloc if url is not None else "?"

    async def _closed(self) -> None:
        if not self._closing:
            log.error("%s: the NATS connection closed for good: %r", self.name, self.nc.last_error)


async def quietly(awaitable: Awaitable[Any], timeout: float = 5.0) -> None:  # noqa: ASYNC109
    """Await a closing step, bounded, and swallow its failure: nothing is left to tell."""
    try:
        async with asyncio.timeout(timeout):
            await awaitable
    except TimeoutError:
        log.warning("closing the NATS connection took over %g s; left behind", timeout)
    except Exception as exc:
        log.debug("closing the NATS connection: %r", exc)
