"""Fixtures the service, worker and integration conftests import (one definition, three scopes)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.integration.servers import RedisServer, make_tiny_model


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture()
def redis_conn(redis_server: RedisServer) -> Iterator[redis.Redis]:
    """A client on an emptied database."""
    conn = redis_server.client()
    conn.flushdb()
    yield conn
    conn.close()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("model"))
