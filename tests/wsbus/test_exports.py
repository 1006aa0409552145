"""Pin the public API: a name leaving ``wsbus`` is a breaking change.

``wsbus`` holds what users need; what only adapter authors and tests use stays public in its
own module (``wsbus.edge.MemoryClient``, ``wsbus.wire.decode_client_frame``, ...).
"""

from __future__ import annotations

import sys

import pytest

import wsbus

EXPECTED = {
    # writing services
    "Address", "ClientAddress", "ClientInfo", "ConnId", "Context", "Envelope", "GatewayAddress",
    "Recipients", "Service", "ServiceAddress", "ServiceLink", "Undeliverable", "handles",
    # running a gateway, and the settings users configure
    "AliasPolicy", "CloseCode", "Codec", "ErrorCode", "Gateway", "GatewayConfig", "MemoryBus",
    "Stats", "WireLimits", "memory_pair",
    # history and resume
    "HistoryConfig", "Position", "ResumeSettings",
    # writing plugins
    "AllowAnonymous", "Drop", "HandshakeRequest", "Identity", "Refusal", "TokenAuth", "Verdict",
    "hookimpl",
    # catching errors: the whole tree of wsbus.errors
    "AliasTaken", "BusError", "BusUnavailable", "ChildFailed", "ConfigError", "ConnIdTaken",
    "ConnectionClosed", "ControlError", "Forbidden", "HandshakeRefused", "InvalidFrame",
    "InvalidName", "MessageRejected", "MissingExtra", "NoRoute", "PluginError", "RateLimited",
    "RegistryError", "RequestTimeout", "ResumeFailed", "ServiceFailed", "TryLater",
    "UnknownConnection", "Unrouted", "WsbusError",
    # the version
    "__version__",
}  # fmt: skip


def test_public_api() -> None:
    assert set(wsbus.__all__) == EXPECTED
    for name in wsbus.__all__:
        assert hasattr(wsbus, name), name


def test_every_exception_is_public() -> None:
    import wsbus.errors

    assert set(wsbus.errors.__all__) <= set(wsbus.__all__)


# Names adapter authors and tests use: public, in their own modules rather than in wsbus.
ADAPTER_NAMES = {
    "wsbus.bus": {
        "Bus",
        "BusSink",
        "ClaimsAliases",
        "HearsGateways",
        "HearsLoss",
        "KeepsHistory",
        "KeepsSessions",
        "PublishesNowait",
        "ReportsAvailability",
    },
    "wsbus.edge": {"ClientConnection", "MemoryClient", "MemoryConnection", "memory_pair"},
    "wsbus.envelope": {"EnvelopeId", "NodeId", "IdFactory", "encode_envelope", "decode_envelope"},
    "wsbus.registry": {"ClientRegistry"},
    "wsbus.router": {"Resolution", "Router"},
    "wsbus.wire": {"ClientFrame", "Rejection", "decode_client_frame", "encode_server_frame"},
    "wsbus.hooks": {"Hooks", "hookspec"},
    "wsbus.control": {
        "ACK_HEADER",
        "PRESENCE",
        "PROCESSED",
        "RECEIPT",
        "RECEIPT_HEADER",
        "REQUEST_TYPES",
        "Delivery",
        "PresenceEvent",
        "Processed",
        "Receipt",
        "Result",
    },
    "wsbus.presence": {"Presence"},
    "wsbus.receipts": {"ReceiptTracker", "Receipts", "merge"},
    "wsbus.history": {
        "GROUP_HEADER",
        "POSITION_HEADER",
        "HistoryConfig",
        "Position",
        "history_group",
        "position_of",
        "stamp",
    },
    "wsbus.resume": {"SessionRecord"},
}


def test_adapter_names_stay_public_in_their_modules() -> None:
    import importlib

    for module_name, names in ADAPTER_NAMES.items():
        module = importlib.import_module(module_name)
        assert names <= set(module.__all__), (module_name, names - set(module.__all__))


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


def _public_modules() -> list[str]:
    """``wsbus`` and each of its modules whose name does not start with ``_``."""
    import pkgutil

    return ["wsbus"] + [
        f"wsbus.{info.name}"
        for info in pkgutil.iter_modules(wsbus.__path__)
        if not info.name.startswith("_")
    ]


def _has_docstring(module_name: str, name: str, seen: frozenset[str] = frozenset()) -> bool:
    """Whether ``name`` in ``module_name`` is documented where it is defined.

    Classes and functions by their own ``__doc__``; constants, type aliases and markers by
    the string literal right after their assignment (what Sphinx reads); names imported
    from a sibling module, where that module defines them.
    """
    import ast
    import importlib
    import inspect

    module = importlib.import_module(module_name)
    obj = getattr(module, name)
    if inspect.isclass(obj):
        return bool(obj.__dict__.get("__doc__"))
    if inspect.isfunction(inspect.unwrap(obj)):  # a function, or one a decorator wraps
        return bool(obj.__doc__)
    assert module.__file__ is not None
    with open(module.__file__, encoding="utf-8") as source:
        body = ast.parse(source.read()).body
    for node, after in zip(body, [*body[1:], None], strict=True):
        targets = (
            node.targets
            if isinstance(node, ast.Assign)
            else [node.target]
            if isinstance(node, ast.AnnAssign)
            else []
        )
        if any(isinstance(t, ast.Name) and t.id == name for t in targets):
            return (
                isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)
            )
    for found in ast.walk(ast.Module(body=body, type_ignores=[])):
        if (
            isinstance(found, ast.ImportFrom)
            and found.level == 1
            and module_name not in seen
            and any(alias.name == name for alias in found.names)
        ):
            return _has_docstring(f"wsbus.{found.module}", name, seen | {module_name})
    return False


def test_every_public_name_of_every_module_has_a_docstring() -> None:
    import importlib

    missing = []
    for module_name in _public_modules():
        module = importlib.import_module(module_name)
        names = getattr(module, "__all__", None)
        assert names is not None, f"{module_name} has no __all__"
        missing += [
            f"{module_name}.{name}"
            for name in names
            if not name.startswith("__") and not _has_docstring(module_name, name)
        ]
    assert not missing, f"public names without a docstring: {missing}"
