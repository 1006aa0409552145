"""Built-in plugins. The gateway's own defaults are plugins too, so they can be replaced.

- :class:`AllowAnonymous`: accepts every client no other plugin decided on, as anonymous.
  The gateway registers it when ``GatewayConfig.allow_anonymous`` is true (the default).
- :class:`TokenAuth`: accepts clients whose bearer token is in a table, as that token's user.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping

from .hooks import HandshakeRequest, Identity, Refusal, hookimpl

__all__ = ["AllowAnonymous", "TokenAuth"]


class AllowAnonymous:
    """Accept, as anonymous, every client that no other plugin accepted or refused."""

    @hookimpl(trylast=True)
    def wsbus_authenticate(self, request: HandshakeRequest) -> Identity:
        """Accept the client with no user."""
        return Identity()


class TokenAuth:
    """Accept clients that present a known bearer token; refuse a wrong one.

    A client with no token is left to the next plugin (or to the ``wsbus.auth`` frame).
    Tokens are compared in constant time.

    Args:
        tokens: token -> user name.
    """

    def __init__(self, tokens: Mapping[str, str]) -> None:
        self._tokens = {token.encode(): user for token, user in tokens.items()}

    @hookimpl
    def wsbus_authenticate(self, request: HandshakeRequest) -> Identity | Refusal | None:
        """Look the request's token up."""
        if request.token is None:
            return None
        offered = request.token.encode("utf-8", "replace")
        user = None
        for token, name in self._tokens.items():
            # Compare against every entry so the time taken does not say which one matched.
            if hmac.compare_digest(token, offered):
                user = name
        if user is None:
            return Refusal("unknown token")
        return Identity(user=user)
