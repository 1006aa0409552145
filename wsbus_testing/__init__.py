"""The wsbus test kit: a pytest plugin, Hypothesis strategies and conformance suites.

- :mod:`wsbus_testing.plugin`: fixtures (``wsbus_gateway``, ``wsbus_connect``, ...), loaded
  automatically through the ``pytest11`` entry point once wsbus is installed.
- :mod:`wsbus_testing.strategies`: Hypothesis strategies for frames, envelopes, recipients
  and registry operations.
- :mod:`wsbus_testing.conformance`: the suite any bus implementation must pass.
- :mod:`wsbus_testing.connection_conformance`: the suite any edge adapter's client
  connection must pass.
- :mod:`wsbus_testing.children`: real ``python -m wsbus_cli`` child processes for tests.
"""
