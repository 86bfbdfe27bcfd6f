"""Who is calling: a site (by its token) or an operator (by the admin token), and may it still.

Tokens arrive in the ``authorization`` metadata as ``Bearer <token>``; they are
hashed and compared against stored hashes in constant time (server.tokens), so
the daemon holds no plaintext token once started. A site token on the Admin
service, or the admin token on the Federation service, is refused. An evicted
site is refused on every data-bearing call (``refuse_evicted``).
"""

from __future__ import annotations

import hmac

import grpc

from common.errors import PermissionDenied, Unauthenticated
from server.records import SiteRecord, SiteState
from server.tokens import ReloadReport, SiteTokens, hashed


def bearer(context: grpc.ServicerContext) -> str:
    """The bearer token of a call, or raise Unauthenticated."""
    for key, value in context.invocation_metadata():
        if key == "authorization" and isinstance(value, str) and value.startswith("Bearer "):
            return value[len("Bearer ") :].strip()
    raise Unauthenticated("no `authorization: Bearer <token>` metadata on the call", field="authorization")


def refuse_evicted(site: SiteRecord) -> None:
    """PERMISSION_DENIED naming the site if an operator evicted it."""
    if site.state is SiteState.EVICTED:
        raise PermissionDenied(
            f"site {site.site_id!r} was evicted from this run; its calls are refused", field="site_id"
        )


class Authenticator:
    """Maps tokens to identities; the site tokens can be reloaded while calls run."""

    def __init__(self, site_tokens: SiteTokens, admin_token: str) -> None:
        self._sites = site_tokens
        self._admin = hashed(admin_token) if admin_token else ""

    def _is_admin(self, token: str) -> bool:
        return bool(self._admin) and hmac.compare_digest(hashed(token), self._admin)

    def site(self, context: grpc.ServicerContext) -> str:
        """The site a Federation call comes from."""
        token = bearer(context)
        site = self._sites.site_of(token)
        if site is not None:
            return site
        if self._is_admin(token):
            raise PermissionDenied("the admin token is not a site token", field="authorization")
        raise Unauthenticated("the token matches no site", field="authorization")

    def admin(self, context: grpc.ServicerContext) -> None:
        """Raise unless an Admin call carries the admin token."""
        token = bearer(context)
        if self._is_admin(token):
            return
        if self._sites.site_of(token) is not None:
            raise PermissionDenied("a site token cannot call the Admin service", field="authorization")
        raise Unauthenticated("the token is not the admin token", field="authorization")

    def reload(self) -> ReloadReport:
        """Re-read the site tokens files (``SiteTokens.reload``): ConfigError keeps the old ones."""
        return self._sites.reload()
