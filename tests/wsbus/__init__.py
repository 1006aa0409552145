"""Tests of the ``wsbus`` package."""
