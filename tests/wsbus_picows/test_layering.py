"""wsbus_picows keeps the layers tests/test_layering.py checks for the other adapters: it
imports from the core only public modules and names, and its entry-point module and package
import no picows (``wsbus --help`` loads them)."""

from __future__ import annotations

import ast

from tests.test_layering import ROOT, _imports, _modules, adapter_problems


def test_the_picows_edge_imports_only_the_core_public_api() -> None:
    problems = [p for path in _modules("wsbus_picows") for p in adapter_problems(_imports(path))]
    assert problems == []


def test_the_entry_point_module_and_the_package_import_no_picows() -> None:
    for name in ("adapter.py", "__init__.py"):
        path = ROOT / "wsbus_picows" / name
        tree = ast.parse(path.read_text(encoding="utf-8"))
        # Only module-level imports run at import time (the adapter imports picows in serve).
        top = [node for node in tree.body if isinstance(node, ast.Import | ast.ImportFrom)]
        modules = [
            alias.name for node in top if isinstance(node, ast.Import) for alias in node.names
        ] + [node.module or "" for node in top if isinstance(node, ast.ImportFrom)]
        assert not [m for m in modules if m.partition(".")[0] == "picows"], (name, modules)
