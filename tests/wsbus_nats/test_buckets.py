"""wsbus_nats.buckets: the directory's buckets as wsbus makes them, on a real nats-server."""

from __future__ import annotations

from collections.abc import AsyncIterator

import msgspec
import nats
import nats.errors
import pytest
from nats.aio.client import Client
from nats.js.api import StreamConfig

from wsbus.errors import ConfigError
from wsbus_nats.buckets import BucketSpec, bucket_specs, open_bucket
from wsbus_nats.servers import NatsServer
from wsbus_nats.subjects import Subjects

SPECS = {spec.name: spec for spec in bucket_specs(Subjects("wsbus"), 1.0)}
ALIASES, SERVICES = SPECS["wsbus_aliases"], SPECS["wsbus_services"]


@pytest.fixture
async def nc(wsbus_nats_server: NatsServer) -> AsyncIterator[Client]:
    client = await nats.connect(wsbus_nats_server.url, allow_reconnect=False)
    yield client
    await client.close()


async def _open(nc: Client, spec: BucketSpec) -> object:
    return await open_bucket(nc.jetstream(timeout=5), spec, replicas=1, create=True, wait=0.05)


@pytest.mark.parametrize(
    ("change", "said"),
    [
        ({"subjects": ["$KV.wsbus_aliases.>", "wsbus.svc.chat.>"]}, "subjects"),
        ({"allow_rollup_hdrs": True, "deny_purge": False}, "rollup"),
        ({"deny_purge": False}, "purges"),
        ({"max_msgs_per_subject": 5}, "5 values per key"),
        ({"max_msg_size": -1}, "largest entry"),
        ({"max_bytes": -1}, "largest size"),
        ({"max_age": 60_000_000_000}, "expire"),  # nanoseconds, as the server says
    ],
)
async def test_a_bucket_not_as_wsbus_makes_it_is_refused(
    nc: Client, change: dict[str, object], said: str
) -> None:
    # Made beforehand by someone else (the server here has no users: anyone may).
    good = {
        "name": "KV_wsbus_aliases",
        "subjects": ["$KV.wsbus_aliases.>"],
        "max_msgs_per_subject": 1,
        "allow_rollup_hdrs": False,
        "deny_delete": True,
        "deny_purge": True,
        "max_msg_size": 1024,
        "max_bytes": 1024 * 1024,
        "allow_direct": True,
        "discard": "new",
    }
    await nc.jetstream(timeout=5).add_stream(StreamConfig.from_response({**good, **change}))
    with pytest.raises(ConfigError) as refused:
        await _open(nc, ALIASES)
    assert said in str(refused.value) and "KV_wsbus_aliases" in str(refused.value)


async def test_nats_pys_own_buckets_are_refused(nc: Client) -> None:
    # nats-py's create_key_value allows rollups: one publish could wipe the table.
    await nc.jetstream(timeout=5).create_key_value(bucket="wsbus_aliases", history=1)
    with pytest.raises(ConfigError, match="rollup"):
        await _open(nc, ALIASES)


async def test_wsbus_buckets_refuse_a_rollup_and_large_entries(nc: Client) -> None:
    aliases = await _open(nc, ALIASES)
    await aliases.put("a", b"node1.1")  # type: ignore[attr-defined]
    await aliases.create("c", b"node1.2")  # type: ignore[attr-defined]
    # H6's wipe: one publish with a rollup header on any key. Refused by the stream.
    answer = await nc.request("$KV.wsbus_aliases.x", b"", headers={"Nats-Rollup": "all"}, timeout=5)
    assert b"error" in answer.data
    assert sorted(await aliases.keys()) == ["a", "c"]  # type: ignore[attr-defined]
    await aliases.delete("a")  # type: ignore[attr-defined]
    assert await aliases.keys() == ["c"]  # type: ignore[attr-defined]
    answer = await nc.request("$KV.wsbus_aliases.big", b"x" * (ALIASES.max_msg_size + 1), timeout=5)
    assert b"error" in answer.data
    services = await _open(nc, SERVICES)
    await services.put("echo.i1", b"x" * 1000)  # type: ignore[attr-defined]
    answer = await nc.request(
        "$KV.wsbus_services.echo.i2", b"x" * (SERVICES.max_msg_size + 1), timeout=5
    )
    assert msgspec.json.decode(answer.data).get("error")
    # Opening them again (another gateway) checks and accepts them.
    await _open(nc, ALIASES)
    await _open(nc, SERVICES)
