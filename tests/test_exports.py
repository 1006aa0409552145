"""Pin the public API: a name leaving ``wsbus`` is a breaking change."""

from __future__ import annotations

import sys

import pytest

import wsbus

EXPECTED = {
    "Address", "AliasPolicy", "AliasTaken", "AllowAnonymous", "Bus", "BusError", "BusSink",
    "BusUnavailable", "ChildFailed", "ClientAddress", "ClientConnection", "ClientFrame",
    "ClientInfo", "ClientRegistry", "CloseCode", "Codec", "ConfigError", "ConnId", "ConnIdTaken",
    "ConnectionClosed", "Context", "ControlError", "Drop", "Envelope", "EnvelopeId", "ErrorCode",
    "Forbidden", "Gateway", "GatewayAddress", "GatewayConfig", "HandshakeRefused",
    "HandshakeRequest", "Hooks", "Identity", "InvalidFrame", "InvalidName", "MemoryBus",
    "MemoryClient", "MemoryConnection", "MessageRejected", "MissingExtra", "NoRoute", "NodeId",
    "PluginError", "RateLimited", "Recipients", "Refusal", "RegistryError", "Rejection",
    "RequestTimeout", "Resolution", "Result", "Router", "Service", "ServiceAddress",
    "ServiceFailed", "ServiceLink", "Stats", "TokenAuth", "TryLater", "Undeliverable",
    "UnknownConnection", "Unrouted", "Verdict", "WireLimits", "WsbusError", "__version__",
    "decode_client_frame", "handles", "hookimpl", "hookspec", "memory_pair"
}  # fmt: skip


def test_public_api() -> None:
    assert set(wsbus.__all__) == EXPECTED
    for name in wsbus.__all__:
        assert hasattr(wsbus, name), name


def test_every_public_name_has_a_docstring() -> None:
    for name in wsbus.__all__:
        obj = getattr(wsbus, name)
        if callable(obj) and not isinstance(obj, type(wsbus.ConnId)):
            assert obj.__doc__, name


def test_exceptions_pickle() -> None:
    import pickle

    for exc in (
        wsbus.NoRoute("t"),
        wsbus.BusUnavailable("down"),
        wsbus.AliasTaken("bob"),
        wsbus.UnknownConnection("n.1"),
        wsbus.InvalidName("alias", "x y"),
        wsbus.ControlError("c", "m"),
        wsbus.RequestTimeout("join", 5.0),
        wsbus.ConnIdTaken("n.1"),
        wsbus.MessageRejected("no_route", "nothing handles t"),
        wsbus.RateLimited("rate_limited", "slow down", True),
        wsbus.PluginError("wsbus_authorize", "acme"),
        wsbus.MissingExtra("pyro"),
        wsbus.ConnectionClosed(4507, "slow"),
        wsbus.ChildFailed("wsbus bus exited:\nboom\n", ["bus"], "boom\n"),
    ):
        copy = pickle.loads(pickle.dumps(exc))
        assert type(copy) is type(exc) and str(copy) == str(exc) and vars(copy) == vars(exc)


def test_error_messages_say_what_to_do() -> None:
    assert "pip install 'wsbus[pyro]'" in str(wsbus.MissingExtra("pyro"))
    assert "suffix" in str(wsbus.AliasTaken("bob"))


def test_a_missing_extra_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    import wsbus_pyro
    import wsbus_websockets

    monkeypatch.setitem(sys.modules, "Pyro5", None)
    monkeypatch.setitem(sys.modules, "websockets", None)
    with pytest.raises(wsbus.MissingExtra, match=r"pip install 'wsbus\[pyro\]'"):
        wsbus_pyro.__getattr__("PyroBus")
    with pytest.raises(wsbus.MissingExtra, match=r"pip install 'wsbus\[websockets\]'"):
        wsbus_websockets.__getattr__("serve")


def test_a_failed_child_says_its_last_line() -> None:
    exc = wsbus.ChildFailed("wsbus bus exited:\nstarting\nport taken\n", ["bus"], "x\n")
    assert isinstance(exc, RuntimeError) and isinstance(exc, wsbus.WsbusError)
    assert exc.last_line == "x" and exc.child_args == ["bus"]
    assert wsbus.ChildFailed("m", [], " \n").last_line == "(it printed nothing)"
