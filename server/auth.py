"""Who is calling: a site (by its token) or an operator (by the admin token), and may it still.

Tokens arrive in the ``authorization`` metadata as ``Bearer <token>``; they are
hashed and compared against stored hashes in constant time (server.tokens), so
the daemon holds no plaintext token once started. A site token on the Admin
service, or the admin token on the Federation service, is refused. An evicted
site is refused on every data-bearing call (``refuse_evicted``).

With ``[tls] bind_site_to_cert`` (mutual TLS), a site's token is taken only
with a client certificate that names the site: its subject CN or one of its
subjectAltName entries equals the site id, so a stolen token alone is not
enough. The certificate is the CA's word (gRPC checked it against
``tls.client_ca`` before the call); the token says which site, the
certificate that the caller is that site.
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
    raise Unauthenticated(
        "no `authorization: Bearer <token>` metadata on the call", field="authorization", reason="NO_TOKEN"
    )


def refuse_evicted(site: SiteRecord) -> None:
    """PERMISSION_DENIED naming the site if an operator evicted it."""
    if site.state is SiteState.EVICTED:
        raise PermissionDenied(
            f"site {site.site_id!r} was evicted from this run; its calls are refused",
            field="site_id",
            reason="SITE_EVICTED",
        )


def certificate_names(context: grpc.ServicerContext) -> tuple[str, ...]:
    """The names the caller's client certificate gives: its subject CN, then its subjectAltNames."""
    auth = context.auth_context()
    names = [*auth.get("x509_common_name", ()), *auth.get("x509_subject_alternative_name", ())]
    return tuple(dict.fromkeys(n.decode("utf-8", "replace") for n in names))


class Authenticator:
    """Maps tokens to identities; the site tokens can be reloaded while calls run."""

    def __init__(self, site_tokens: SiteTokens, admin_token: str, *, bind_site_to_cert: bool = False) -> None:
        self._sites = site_tokens
        self._admin = hashed(admin_token) if admin_token else ""
        self._bind = bind_site_to_cert

    def _is_admin(self, token: str) -> bool:
        return bool(self._admin) and hmac.compare_digest(hashed(token), self._admin)

    def site(self, context: grpc.ServicerContext) -> str:
        """The site a Federation call comes from."""
        token = bearer(context)
        site = self._sites.site_of(token)
        if site is not None:
            if self._bind:
                _check_certificate(site, certificate_names(context))
            return site
        if self._is_admin(token):
            raise PermissionDenied(
                "the admin token is not a site token", field="authorization", reason="WRONG_SERVICE"
            )
        raise Unauthenticated("the token matches no site", field="authorization", reason="UNKNOWN_TOKEN")

    def admin(self, context: grpc.ServicerContext) -> None:
        """Raise unless an Admin call carries the admin token."""
        token = bearer(context)
        if self._is_admin(token):
            return
        if self._sites.site_of(token) is not None:
            raise PermissionDenied(
                "a site token cannot call the Admin service", field="authorization", reason="WRONG_SERVICE"
            )
        raise Unauthenticated(
            "the token is not the admin token", field="authorization", reason="UNKNOWN_TOKEN"
        )

    def reload(self) -> ReloadReport:
        """Re-read the site tokens files (``SiteTokens.reload``): ConfigError keeps the old ones."""
        return self._sites.reload()


def _check_certificate(site: str, names: tuple[str, ...]) -> None:
    """PERMISSION_DENIED (CERT_MISMATCH) unless the client certificate names ``site``."""
    if site in names:
        return
    presented = ", ".join(repr(n) for n in names[:4]) or "no certificate"
    raise PermissionDenied(
        f"the token is site {site!r}'s but the client certificate names {presented}; this aggregator "
        f"binds each site to a certificate whose CN or subjectAltName is the site id "
        f"(tls.bind_site_to_cert)",
        field="authorization",
        reason="CERT_MISMATCH",
        metadata={"expected": site, "presented": ",".join(names)[:256]},
    )
