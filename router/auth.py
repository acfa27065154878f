"""API keys and the admin token, checked the same way for HTTP and gRPC.

Where keys come from: ``router.api_keys`` in the config plus ``PDSERVE_API_KEYS``
(comma-separated) in the router's environment; the admin token from ``router.admin_token`` or
``PDSERVE_ADMIN_TOKEN``. Clients send ``Authorization: Bearer <key>`` (an HTTP header, or gRPC
metadata ``authorization``).

  * no API keys configured: the API is open, which is why the config refuses to serve on a
    non-loopback address without keys (``cluster.config.RouterConfig``);
  * admin endpoints (``/admin/...``, the console's controls) need the admin token, never an
    API key; with no admin token configured they are disabled (403), not open.

Only SHA-256 digests of the secrets are kept, and every check compares against all of them
with ``hmac.compare_digest``, so timing does not reveal how much of a key matched.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable

from pdserve import envs

from .errors import Forbidden, Unauthenticated


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def bearer(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` value (None if absent/other scheme)."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


class Auth:
    def __init__(self, api_keys: Iterable[str] = (), admin_token: str | None = None) -> None:
        self._keys = [_digest(k) for k in api_keys if k]
        self._admin = _digest(admin_token) if admin_token else None

    @classmethod
    def from_config(cls, router: dict) -> Auth:
        """``router`` is ``RouterConfig`` as a dict; the environment adds to it."""
        keys = [*(router.get("api_keys") or ()), *envs.api_keys()]
        return cls(keys, router.get("admin_token") or envs.admin_token())

    @property
    def open(self) -> bool:
        """True when no API keys are configured (anyone may call the API)."""
        return not self._keys

    def check_key(self, authorization: str | None) -> None:
        """Raise ``Unauthenticated`` unless the request carries a valid API key."""
        if self.open:
            return
        token = bearer(authorization)
        if token is None:
            raise Unauthenticated("missing API key: send the header 'Authorization: Bearer "
                                  "<key>' (gRPC: metadata 'authorization')", code="missing_api_key")
        d = _digest(token)
        if not _any_equal(d, self._keys):
            raise Unauthenticated("invalid API key: check the key you were given",
                                  code="invalid_api_key")

    def check_admin(self, authorization: str | None) -> None:
        """Raise ``Forbidden``/``Unauthenticated`` unless the request carries the admin token."""
        if self._admin is None:
            raise Forbidden("admin endpoints are disabled: set router.admin_token or "
                            f"{envs.PDSERVE_ADMIN_TOKEN} to enable them")
        token = bearer(authorization)
        if token is None or not _any_equal(_digest(token), [self._admin]):
            raise Unauthenticated("admin endpoints need the admin token: send 'Authorization: "
                                  "Bearer <admin token>'", code="invalid_admin_token")


def _any_equal(d: bytes, digests: list[bytes]) -> bool:
    ok = False
    for k in digests:  # no early exit: the time taken does not depend on which key matched
        ok |= hmac.compare_digest(d, k)
    return ok
