"""The picows internals the edge relies on are where it expects them (see
wsbus_picows/_protocol.py): a release that moves one fails here, naming it."""

from wsbus_picows._protocol import check_internals


def test_picows_internals_we_rely_on_are_there() -> None:
    problems = check_internals()
    assert not problems, "picows changed: " + "; ".join(problems)
