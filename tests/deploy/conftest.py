from tests.integration.fixtures import redis_conn, redis_server, tiny_model  # noqa: F401
