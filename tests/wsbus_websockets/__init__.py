"""Tests of the ``wsbus_websockets`` package."""
