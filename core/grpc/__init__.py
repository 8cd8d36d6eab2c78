"""gRPC serving: a trio server on h2's state machine (server.py, connection.py, bridge.py)."""
