"""Tests of the ``wsbus_cli`` package."""
