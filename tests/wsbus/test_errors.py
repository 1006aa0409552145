"""wsbus/errors.py: one tree of exceptions, drawn in its docstring, and what clients are raised.

The drawing is checked against the classes (parents and mix-ins, in order), and every
exception class in the wsbus packages against the drawing, by reading their source: a class
that leaves the tree, or a drawing that stops telling the truth, fails here.
"""

from __future__ import annotations

import ast
import asyncio
import builtins
import pickle
import re
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest

import wsbus.errors
from wsbus import Envelope, GatewayConfig, Service, Verdict, hookimpl
from wsbus.envelope import ClientAddress
from wsbus.errors import (
    Forbidden,
    InvalidFrame,
    MessageRejected,
    RateLimited,
    ResumeFailed,
    ServiceFailed,
    TryLater,
    Unrouted,
    WsbusError,
)
from wsbus.wire import ErrorCode
from wsbus_testing.services import Failing

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("wsbus", "wsbus_websockets", "wsbus_pyro", "wsbus_testing", "wsbus_cli")
_BUILTIN_EXCEPTIONS = frozenset(
    name
    for name, value in vars(builtins).items()
    if isinstance(value, type) and issubclass(value, BaseException)
)
_LINE = re.compile(r"(?P<branch>[ |+-]*)(?P<name>[A-Z]\w*)(?: \((?P<mixins>[\w, ]+)\))?")


def drawn_tree() -> dict[str, tuple[str, ...]]:
    """Each class drawn in wsbus/errors.py's docstring, with its bases as drawn, in order."""
    doc = wsbus.errors.__doc__ or ""
    block = doc.split("::", 1)[1].split("\n\n")[1]
    tree: dict[str, tuple[str, ...]] = {}
    parents: list[tuple[int, str]] = []  # (column of the name, name), the open branch
    for line in block.splitlines():
        match = _LINE.match(line)
        assert match, f"cannot read this line of the drawing: {line!r}"
        name, column = match["name"], len(match["branch"])
        while parents and parents[-1][0] >= column:
            parents.pop()
        mixins = tuple(m.strip() for m in (match["mixins"] or "").split(",") if m.strip())
        parent = (parents[-1][1],) if parents else ("Exception",)
        assert name not in tree, f"{name} is drawn twice"
        tree[name] = parent + mixins
        parents.append((column, name))
    return tree


def class_defs() -> Iterator[tuple[str, ast.ClassDef]]:
    """Every class statement in the wsbus packages, with its file, at any depth."""
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
            for node in ast.walk(tree):
                if isinstance(node, ast.ClassDef):
                    yield str(path.relative_to(ROOT)), node


def _base_name(node: ast.expr) -> str:
    """``Foo`` for ``Foo``, ``mod.Foo`` and ``Foo[T]``."""
    if isinstance(node, ast.Subscript):
        return _base_name(node.value)
    if isinstance(node, ast.Attribute):
        return node.attr
    return node.id if isinstance(node, ast.Name) else ""


def exception_classes() -> dict[str, tuple[str, list[str]]]:
    """Every exception class the packages define: name -> (file, base names)."""
    classes: dict[str, tuple[str, list[str]]] = {}
    for file, node in class_defs():
        classes[f"{file}:{node.name}"] = (file, [_base_name(b) for b in node.bases])
    by_name = {key.split(":")[1]: bases for key, (_, bases) in classes.items()}

    def is_exception(name: str, seen: frozenset[str] = frozenset()) -> bool:
        if name in _BUILTIN_EXCEPTIONS or name.endswith(("Error", "Exception")):
            return True  # a built-in, or another library's exception
        if name in seen or name not in by_name:
            return False
        return any(is_exception(base, seen | {name}) for base in by_name[name])

    return {
        key: (file, bases)
        for key, (file, bases) in classes.items()
        if any(is_exception(base) for base in bases)
    }


def test_the_drawing_is_the_class_hierarchy() -> None:
    tree = drawn_tree()
    defined = {
        name
        for name, value in vars(wsbus.errors).items()
        if isinstance(value, type) and issubclass(value, BaseException)
    }
    assert set(tree) == defined, "the drawing and wsbus/errors.py name different classes"
    for name, bases in tree.items():
        cls = getattr(wsbus.errors, name)
        assert tuple(base.__name__ for base in cls.__bases__) == bases, name
        assert name in wsbus.errors.__all__, name
        assert cls.__doc__, name
    assert tree["WsbusError"] == ("Exception",)


def test_every_exception_in_the_packages_is_in_the_tree() -> None:
    drawn = drawn_tree()
    found = exception_classes()
    assert "wsbus/errors.py:WsbusError" in found  # the walk sees the tree itself
    for key, (file, _) in found.items():
        name = key.split(":")[1]
        if name.startswith("_"):
            # Private control flow (wire.py's _Reject): caught where it is raised, never
            # seen by a user. Keep such classes private.
            continue
        assert file == "wsbus/errors.py", f"{key}: define exceptions in wsbus/errors.py"
        assert name in drawn, f"{key} is not drawn in wsbus/errors.py's tree"
        assert issubclass(getattr(wsbus.errors, name), WsbusError), key


_SAMPLES = {"str": "x y", "int": 4429, "float": 2.5, "bool": True, "Sequence[str]": ["bus"]}


def test_every_exception_in_the_tree_pickles_with_its_data() -> None:
    import inspect

    for name in drawn_tree():
        cls = getattr(wsbus.errors, name)
        init = next(
            (
                vars(c)["__init__"]
                for c in cls.__mro__
                if c.__module__ == "wsbus.errors" and "__init__" in vars(c)
            ),
            None,
        )
        if init is None:
            exc = cls("what happened, to what, what to do")
        else:
            params = list(inspect.signature(init).parameters.values())[1:]  # after self
            exc = cls(*(_SAMPLES[str(p.annotation)] for p in params))
        copy = pickle.loads(pickle.dumps(exc))
        assert type(copy) is type(exc) and vars(copy) == vars(exc), name
        assert str(copy) == str(exc) and str(exc), name


def test_every_error_code_has_its_exception() -> None:
    for code in ErrorCode:
        exc = MessageRejected.for_code(code.value, "why", code.retry)
        assert type(exc) is not MessageRejected, f"{code} has no exception of its own"
        assert (exc.code, exc.message, exc.retry) == (code.value, "why", code.retry)
        assert isinstance(exc, TryLater) == code.retry, code
        # Forbidden and a refused resume spend the error budget too, but the frame was fine.
        assert isinstance(exc, InvalidFrame) == (
            code.client_fault and code not in (ErrorCode.FORBIDDEN, ErrorCode.RESUME_FAILED)
        ), code
    assert isinstance(MessageRejected.for_code("rate_limited", "", True), RateLimited)
    assert isinstance(MessageRejected.for_code("resume_failed", "", False), ResumeFailed)
    assert isinstance(MessageRejected.for_code("no_route", "", False), LookupError)
    assert isinstance(MessageRejected.for_code("bad_value", "", False), ValueError)


def test_a_code_from_a_newer_gateway_is_still_a_rejection() -> None:
    exc = MessageRejected.for_code("quota_exceeded", "over quota", True)
    assert (
        type(exc) is MessageRejected
        and exc.retry
        and str(exc) == ("quota_exceeded: over quota (retry later)")
    )


def test_rejections_pickle_as_their_class() -> None:
    for code in ErrorCode:
        exc = MessageRejected.for_code(code.value, "why", code.retry)
        copy = pickle.loads(pickle.dumps(exc))
        assert type(copy) is type(exc) and vars(copy) == vars(exc) and str(copy) == str(exc)


# -- the Python client, against a real gateway on a real socket ---------------------------


class _DenySecrets:
    """Refuses ``secret.*`` messages, as an authorization plugin would."""

    @hookimpl
    def wsbus_authorize(self, client: ClientAddress, message: Envelope) -> Verdict | None:
        return Verdict.deny("secrets are not for you") if message.type == "secret.x" else None


@pytest.fixture
def wsbus_services() -> list[Service]:
    return [Failing()]


@pytest.fixture
def wsbus_plugins() -> list[object]:
    return [_DenySecrets()]


@pytest.fixture
def wsbus_config() -> GatewayConfig:
    # One token and (practically) no refill: the second frame is rate limited whatever the
    # machine's speed.
    return GatewayConfig(node="t", rate=0.001, burst=4)


async def test_the_client_raises_the_exception_for_each_refusal(
    wsbus_ws_connect: Callable[..., Awaitable[object]],
) -> None:
    from wsbus_websockets import Client

    client = await wsbus_ws_connect()
    assert isinstance(client, Client)
    expected: list[tuple[str, type[MessageRejected], str]] = [
        ("nobody.handles.this", Unrouted, "no_route"),
        ("secret.x", Forbidden, "forbidden"),
        ("failing.raise", ServiceFailed, "service_error"),
        ("wsbus.nope", InvalidFrame, "reserved_type"),
        ("echo", RateLimited, "rate_limited"),  # the fifth frame: the burst is spent
    ]
    for type, cls, code in expected:
        async with asyncio.timeout(30):
            with pytest.raises(cls) as info:
                await client.request(type, {"x": 1}, timeout=60)
        assert info.value.code == code
        assert info.value.retry == ErrorCode(code).retry


async def test_opening_raises_from_the_tree_for_a_bad_url_and_a_silent_server() -> None:
    import socket

    from wsbus.errors import ConfigError, RequestTimeout
    from wsbus_websockets import connect

    with pytest.raises(ConfigError, match="not a WebSocket URL"):
        async with asyncio.timeout(30):
            await connect("http://127.0.0.1:1/")
    # A listener that accepts (the kernel does) and never answers the upgrade.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        url = f"ws://127.0.0.1:{silent.getsockname()[1]}/"
        with pytest.raises(RequestTimeout) as info:
            async with asyncio.timeout(30):
                await connect(url, open_timeout=0.2)
    assert isinstance(info.value, TimeoutError) and url in info.value.what
