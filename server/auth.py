"""Who is calling: a site (by its token) or an operator (by the admin token).

Tokens arrive in the ``authorization`` metadata as ``Bearer <token>`` and are
compared in constant time. A site token on the Admin service, or the admin
token on the Federation service, is refused.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping

import grpc

from common.errors import PermissionDenied, Unauthenticated


def bearer(context: grpc.ServicerContext) -> str:
    """The bearer token of a call, or raise Unauthenticated."""
    for key, value in context.invocation_metadata():
        if key == "authorization" and isinstance(value, str) and value.startswith("Bearer "):
            return value[len("Bearer ") :].strip()
    raise Unauthenticated("no `authorization: Bearer <token>` metadata on the call", field="authorization")


class Authenticator:
    """Maps tokens to identities."""

    def __init__(self, site_tokens: Mapping[str, str], admin_token: str) -> None:
        self._sites = dict(site_tokens)
        self._admin = admin_token

    def site(self, context: grpc.ServicerContext) -> str:
        """The site a Federation call comes from."""
        token = bearer(context)
        for site_id, expected in self._sites.items():
            if hmac.compare_digest(token.encode(), expected.encode()):
                return site_id
        if self._admin and hmac.compare_digest(token.encode(), self._admin.encode()):
            raise PermissionDenied("the admin token is not a site token", field="authorization")
        raise Unauthenticated("the token matches no site", field="authorization")

    def admin(self, context: grpc.ServicerContext) -> None:
        """Raise unless an Admin call carries the admin token."""
        token = bearer(context)
        if self._admin and hmac.compare_digest(token.encode(), self._admin.encode()):
            return
        if any(hmac.compare_digest(token.encode(), t.encode()) for t in self._sites.values()):
            raise PermissionDenied("a site token cannot call the Admin service", field="authorization")
        raise Unauthenticated("the token is not the admin token", field="authorization")
