"""The Pyro5 internals wsbus relies on are still there (wsbus_pyro/_internals.py).

A Pyro5 release that moves one of them must fail here, loudly and by name, rather than
silently turn a safety measure off.
"""

from __future__ import annotations

import struct

import Pyro5
import pytest
from Pyro5 import errors as pyro_errors
from Pyro5 import protocol
from Pyro5.server import Daemon

from wsbus_pyro import PyroConfig, _internals
from wsbus_pyro.config import apply


def test_pyro5_internals_we_rely_on_are_there() -> None:
    missing = _internals.missing()
    assert missing == [], (
        f"Pyro5 {Pyro5.__version__} moved internals wsbus relies on: {missing}. "
        "Update wsbus_pyro/_internals.py (and the supported versions in docs/pyro.md) "
        "before using this release."
    )


def header(msg_type: int, flags: int, serializer_id: int, size: int = 0) -> bytes:
    """A Pyro wire header, as a peer could send it."""
    message = protocol.SendingMessage(msg_type, 0, 0, serializer_id, b"")
    data = bytearray(message.data[: protocol._header_size])
    struct.pack_into("!H", data, 8, flags)
    fields = list(struct.unpack(protocol._header_format, bytes(data)))
    fields[6] = size  # data size, checked before any payload is read
    return struct.pack(protocol._header_format, *fields)


@pytest.mark.parametrize(
    ("msg_type", "flags", "serializer_id", "size"),
    [
        (protocol.MSG_INVOKE, protocol.FLAGS_KEEPSERIALIZED, 1, 10),
        (protocol.MSG_INVOKE, protocol.FLAGS_COMPRESSED, 1, 10),
        (protocol.MSG_INVOKE, 0, 2, 10),  # marshal
        (protocol.MSG_CONNECT, 0, 1, _internals.MAX_HANDSHAKE_BYTES + 1),
    ],
    ids=["keep-serialized", "compressed", "marshal", "large handshake"],
)
def test_the_header_check_refuses_before_the_payload(
    msg_type: int, flags: int, serializer_id: int, size: int
) -> None:
    apply(PyroConfig())
    with pytest.raises(pyro_errors.ProtocolError):
        _internals.parse_header(header(msg_type, flags, serializer_id, size))
    # The same header without the offending part is accepted.
    _internals.parse_header(header(protocol.MSG_INVOKE, 0, 1, 10))


def test_the_daemon_keep_serialized_path_is_refused() -> None:
    apply(PyroConfig())
    with pytest.raises(pyro_errors.SecurityError):
        getattr(Daemon, "_Daemon__deserializeBlobArgs")(None, None)  # noqa: B009


def test_a_moved_internal_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(Daemon, "_handshake")
    monkeypatch.delattr(protocol, "FLAGS_KEEPSERIALIZED")
    missing = _internals.missing()
    assert any("_handshake" in name for name in missing), missing
    assert any("FLAGS_KEEPSERIALIZED" in name for name in missing), missing
