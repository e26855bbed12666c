"""API keys: who is asking, as a tenant id; the service is open when no key is configured.

A job belongs to the tenant that submitted it. A tenant id is a hash of its key, so keys are
never stored or logged; keys are compared in constant time.
"""

import hashlib
import hmac

from fastapi import HTTPException, Request

# The tenant of every job when the service is open (no API keys).
OPEN = ""


def tenant_id(key: str) -> str:
    """The tenant a key stands for: a hash of it, so the key itself is never stored."""
    return hashlib.sha256(key.encode()).hexdigest()[:32]


class ApiKeys:
    """The configured keys; ``tenant_of(request)`` checks a request's bearer token."""

    def __init__(self, keys: tuple[str, ...]) -> None:
        self._keys = [(key.encode(), tenant_id(key)) for key in keys]

    @property
    def required(self) -> bool:
        """Whether requests must carry a key."""
        return bool(self._keys)

    def tenant_of(self, request: Request) -> str:
        """The tenant of the request's key; 401 without a key, or with a wrong one."""
        if not self._keys:
            return OPEN
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise _unauthorized("Authorization: Bearer <API key> is required")
        tenant = self._match(token.strip().encode())
        if tenant is None:
            raise _unauthorized("The API key is not valid")
        return tenant

    def _match(self, presented: bytes) -> str | None:
        # Every key is compared, whichever matches: the time taken says nothing about them.
        found = None
        for key, tenant in self._keys:
            if hmac.compare_digest(key, presented):
                found = tenant
        return found


def _unauthorized(detail: str) -> HTTPException:
    return HTTPException(401, detail, headers={"WWW-Authenticate": "Bearer"})
