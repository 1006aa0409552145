"""The websockets edge's attack tests (tests/wsbus_websockets/test_attacks.py), against the
picows edge: ``wsbus_server`` is the picows edge here (see conftest.py)."""

from tests.wsbus_websockets.test_attacks import *  # noqa: F403
