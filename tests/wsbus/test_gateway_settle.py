"""The gateway's settling of deliveries taken and not yet on the socket (wsbus/gateway.py's
_Settler): one callback per pass and one timer for every session, not one per connection."""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any

from wsbus.gateway import SETTLE_INTERVAL, _Settler

TIMEOUT = 5.0


class _Session:
    """What the settler reads of a session: its unconfirmed deliveries and settle()."""

    def __init__(self, waiting: int) -> None:
        # How many looks it takes before the transport has sent everything.
        self.waiting = waiting
        self.unconfirmed: deque[bool] | None = deque([True])
        self.looks = 0

    def settle(self) -> None:
        self.looks += 1
        if self.looks >= self.waiting:
            self.unconfirmed = None


async def test_sessions_added_in_one_pass_are_settled_by_one_callback_then_one_timer() -> None:
    loop = asyncio.get_running_loop()
    settler = _Settler()
    fast = [_Session(1) for _ in range(500)]
    slow = [_Session(3) for _ in range(500)]
    ready = len(loop._ready)  # type: ignore[attr-defined]
    for session in [*fast, *slow]:
        settler.add(session)  # type: ignore[arg-type]
    # One callback for the pass, whatever the number of sessions.
    assert len(loop._ready) == ready + 1  # type: ignore[attr-defined]
    await asyncio.sleep(0)
    assert all(s.looks == 1 and s.unconfirmed is None for s in fast)
    assert all(s.looks == 1 and s.unconfirmed is not None for s in slow)
    # The ones still waiting are looked at again, each once per interval, until all are sent.
    async with asyncio.timeout(TIMEOUT):
        while any(s.unconfirmed is not None for s in slow):
            await asyncio.sleep(SETTLE_INTERVAL / 2)
    assert [s.looks for s in slow] == [3] * 500
    assert [s.looks for s in fast] == [1] * 500
    assert settler._timer is None and not settler._later


async def test_an_ended_session_is_not_looked_at_again() -> None:
    settler = _Settler()
    session = _Session(10)
    settler.add(session)  # type: ignore[arg-type]
    await asyncio.sleep(0)
    assert session.looks == 1
    session.unconfirmed = None  # discard() counted the rest when the connection ended
    await asyncio.sleep(SETTLE_INTERVAL * 2)
    assert session.looks == 1
    timer: Any = settler._timer
    assert timer is None and not settler._later
