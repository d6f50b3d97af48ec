"""Optional API keys: a bearer token from ``serve.api_keys`` names the tenant of its sessions."""

from __future__ import annotations

import hmac

from specd.serve import errors


class KeyRing:
    def __init__(self, keys: dict[str, str], default_tenant: str) -> None:
        self.keys = dict(keys)
        self.default_tenant = default_tenant

    def tenant(self, authorization: str | None) -> str:
        """The tenant of a request's ``Authorization`` header; 401 when keys are set and it is wrong."""
        if not self.keys:
            return self.default_tenant
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() == "bearer":
            for key, tenant in self.keys.items():  # constant time per key: no timing oracle
                if hmac.compare_digest(key.encode(), token.strip().encode()):
                    return tenant
        raise errors.bad_key()
