"""Tests of the ``wsbus_pyro`` package."""
