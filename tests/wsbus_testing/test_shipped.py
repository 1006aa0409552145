"""wsbus_testing is shipped (the testing extra): it may import nothing that is not, neither
wsbus's own tests nor its benchmarks, so a third-party edge or bus can run its suites."""

from __future__ import annotations

from tests.test_layering import _imports, _modules


def test_the_kit_imports_neither_the_tests_nor_the_benchmarks() -> None:
    found = [
        str(imported)
        for path in _modules("wsbus_testing")
        for imported in _imports(path)
        if imported.module.partition(".")[0] in ("tests", "bench")
    ]
    assert found == []
