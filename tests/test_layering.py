"""The layers: the core imports no adapter, the adapters import only the core's public API.

Read from the source with ``ast`` (nothing is imported, so no import has a side effect and a
lazy or conditional import is seen as well as a top-level one):

- no module under ``wsbus/`` imports a ``wsbus_*`` package or a transport library, anywhere
  in the module (inside a function, under ``TYPE_CHECKING``, ...);
- the adapters (``wsbus_websockets``, ``wsbus_asgi``, ``wsbus_pyro``, ``wsbus_nats``,
  ``wsbus_testing``) and the composition root (``wsbus_cli``) import from the core only
  ``wsbus`` or a public ``wsbus.<module>`` (no leading underscore), and from it only names
  in that module's ``__all__`` (or a public submodule).
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CORE = "wsbus"
ADAPTERS = (
    "wsbus_websockets",
    "wsbus_asgi",
    "wsbus_pyro",
    "wsbus_nats",
    "wsbus_testing",
    "wsbus_cli",
)
TRANSPORTS = frozenset(
    {
        "websockets",
        "Pyro5",
        "nats",
        "picows",
        "socketio",
        "aiohttp",
        "uvicorn",
        "starlette",
        "fastapi",
    }
)


@dataclass(frozen=True)
class Import:
    """One import in a module: ``from module import names`` or ``import module``."""

    path: Path
    line: int
    module: str
    names: tuple[str, ...]
    text: str

    def __str__(self) -> str:
        where = self.path.relative_to(ROOT) if self.path.is_relative_to(ROOT) else self.path
        return f"{where}:{self.line}: {self.text}"


def _modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, package: str | None = None) -> Iterator[Import]:
    """Every import statement in ``path``, with relative ones made absolute."""
    source = path.read_text(encoding="utf-8")
    tree = ast.parse(source, filename=str(path))
    if package is None:
        package = _module_name(path)
        if path.name != "__init__.py":
            package = package.rpartition(".")[0]
    for node in ast.walk(tree):
        if not isinstance(node, ast.Import | ast.ImportFrom):
            continue
        text = ast.get_source_segment(source, node) or ""
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(path, node.lineno, alias.name, (), text)
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join([*base, module] if module else base)
            names = tuple(alias.name for alias in node.names)
            yield Import(path, node.lineno, module, names, " ".join(text.split()))


@cache
def _all(module: str) -> frozenset[str] | None:
    """The names of ``module``'s ``__all__`` (a literal list or tuple), or None if it has none."""
    parts = module.split(".")
    path = ROOT.joinpath(*parts).with_suffix(".py")
    if not path.exists():
        path = ROOT.joinpath(*parts, "__init__.py")
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign):
            targets, value = node.targets, node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            targets, value = [node.target], node.value
        else:
            continue
        if any(isinstance(t, ast.Name) and t.id == "__all__" for t in targets):
            return frozenset(ast.literal_eval(value))
    return None


def _is_public_module(module: str) -> bool:
    parts = module.split(".")
    if any(part.startswith("_") for part in parts[1:]):
        return False
    return (
        ROOT.joinpath(*parts).with_suffix(".py").exists()
        or ROOT.joinpath(*parts, "__init__.py").exists()
    )


def core_problems(imports: Iterable[Import]) -> list[str]:
    """The imports, of those in a core module, of an adapter package or a transport."""
    found = []
    for imported in imports:
        top = imported.module.partition(".")[0]
        if top.startswith("wsbus_") or top in TRANSPORTS:
            found.append(f"{imported}  (the core imports {top!r})")
    return found


def adapter_problems(imports: Iterable[Import]) -> list[str]:
    """The imports, of those in an adapter, of the core's private modules or names."""
    found = []
    for imported in imports:
        module = imported.module
        if module != CORE and not module.startswith(CORE + "."):
            continue
        if not _is_public_module(module):
            found.append(f"{imported}  ({module} is not a public module of the core)")
            continue
        public = _all(module) or frozenset()
        for name in imported.names:  # none for ``import wsbus.errors``: a public module
            if name in public or _is_public_module(f"{module}.{name}"):
                continue
            found.append(f"{imported}  ({name!r} is not in {module}.__all__)")
    return found


def core_violations() -> list[str]:
    """Imports in the core of an adapter package or a transport library."""
    return [problem for path in _modules(CORE) for problem in core_problems(_imports(path))]


def adapter_violations(package: str) -> list[str]:
    """Imports in ``package`` of the core's private modules or of names not in ``__all__``."""
    return [problem for path in _modules(package) for problem in adapter_problems(_imports(path))]


def test_the_core_imports_no_adapter_and_no_transport() -> None:
    violations = core_violations()
    assert not violations, "the core must not import these:\n" + "\n".join(violations)


@pytest.mark.parametrize("package", ADAPTERS)
def test_an_adapter_imports_only_the_public_api_of_the_core(package: str) -> None:
    violations = adapter_violations(package)
    assert not violations, (
        f"{package} imports what the core does not export (make it public in the core "
        "module's __all__, or stop using it):\n" + "\n".join(violations)
    )


def test_the_checks_see_what_they_look_for(tmp_path: Path) -> None:
    # The checks must not pass because they see nothing: plant each kind of import.
    core = _imports(ROOT / CORE / "gateway.py")
    assert any(i.module == "wsbus.errors" for i in core)  # a relative import, made absolute
    planted = tmp_path / "planted.py"
    planted.write_text(
        "def f():\n    import websockets\n    from wsbus._lazy import x\n"
        "    from wsbus.gateway import Gateway, _ref\n"
    )
    imports = list(_imports(planted, "wsbus"))
    assert [(i.line, i.module) for i in imports] == [
        (2, "websockets"),
        (3, "wsbus._lazy"),
        (4, "wsbus.gateway"),
    ]
    assert str(imports[0]).endswith("planted.py:2: import websockets")
    assert len(core_problems(imports)) == 1 and "'websockets'" in core_problems(imports)[0]
    problems = adapter_problems(imports)
    assert len(problems) == 2
    assert "planted.py:3:" in problems[0] and "wsbus._lazy is not a public module" in problems[0]
    assert (
        "planted.py:4:" in problems[1] and "'_ref' is not in wsbus.gateway.__all__" in problems[1]
    )
    assert not _is_public_module("wsbus._lazy") and _is_public_module("wsbus.gateway")
    gateway_all = _all("wsbus.gateway")
    assert gateway_all is not None and "Gateway" in gateway_all and "_ref" not in gateway_all
