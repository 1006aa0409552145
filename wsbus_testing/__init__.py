"""The wsbus test kit: a pytest plugin, Hypothesis strategies and conformance suites.

- :mod:`wsbus_testing.plugin`: fixtures (``wsbus_gateway``, ``wsbus_connect``, ...), loaded
  automatically through the ``pytest11`` entry point once wsbus is installed.
- :mod:`wsbus_testing.strategies`: Hypothesis strategies for frames, envelopes, recipients
  and registry operations.
- :mod:`wsbus_testing.conformance`: the suite any bus implementation must pass.
- :mod:`wsbus_testing.connection_conformance`: the suite any edge adapter's client
  connection must pass.
- :mod:`wsbus_testing.edge_conformance` and :mod:`wsbus_testing.edge_attacks`: the suites a
  WebSocket edge runs on a real server (what every edge does; hostile clients), given its
  ``serve`` (:mod:`wsbus_testing.edges`); :mod:`wsbus_testing.raw`, a raw WebSocket client.
- :mod:`wsbus_testing.accounting`: ``assert_balanced``, the gateway's counter identities.
- :mod:`wsbus_testing.children`: real ``python -m wsbus_cli`` child processes for tests.
"""
