"""gRPC serving: grpclib hosted inside trio (see bridge.py)."""
