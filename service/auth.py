"""Optional API keys: `Authorization: Bearer KEY`. A job belongs to the hash of the key that made it."""

from __future__ import annotations

import hashlib

from fastapi import Request

from service.errors import Problem

ANONYMOUS = "anonymous"


def key_hash(key: str) -> str:
    """What Redis stores as a job's owner (never the key itself)."""
    return hashlib.sha256(b"edm-serve-key:" + key.encode()).hexdigest()[:32]


def _unauthorized(detail: str) -> Problem:
    return Problem(401, detail, headers={"WWW-Authenticate": 'Bearer realm="edm-serve"'})


async def owner_of_request(request: Request) -> str:
    """The caller's owner id: ANONYMOUS when no keys are configured, else the hash of a valid key."""
    accepted: frozenset[str] = request.app.state.key_hashes
    if not accepted:
        return ANONYMOUS
    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise _unauthorized("this server needs an API key: Authorization: Bearer KEY")
    owner = key_hash(key.strip())
    if owner not in accepted:
        raise _unauthorized("unknown API key")
    return owner
