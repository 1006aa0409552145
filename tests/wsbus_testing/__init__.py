"""Tests of the ``wsbus_testing`` package."""
