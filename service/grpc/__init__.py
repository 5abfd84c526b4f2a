"""The gateway's gRPC API (package edm.v1): servicer, server, interceptor, auth.

`server.start(app)` runs it beside the REST app on EDM_GRPC_PORT; it shares the app's settings,
ledger, catalog and metrics. Importing this package imports nothing heavy: the generated stubs
are loaded by the modules that need them.
"""
