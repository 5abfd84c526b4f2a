"""API keys from call metadata (`authorization: Bearer KEY`), as the REST API reads its header."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import grpc

from service.auth import ANONYMOUS, key_hash
from service.grpc.errors import RpcFailure


def owner_of_call(metadata: Iterable[Any] | None, accepted: frozenset[str]) -> str:
    """The caller's owner id: ANONYMOUS when no keys are configured, else the hash of a valid key."""
    if not accepted:
        return ANONYMOUS
    value = next((item[1] for item in metadata or () if item[0] == "authorization"), "")
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    scheme, _, key = value.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise RpcFailure(grpc.StatusCode.UNAUTHENTICATED,
                         "this server needs an API key: metadata authorization: Bearer KEY")
    owner = key_hash(key.strip())
    if owner not in accepted:
        raise RpcFailure(grpc.StatusCode.UNAUTHENTICATED, "unknown API key")
    return owner
