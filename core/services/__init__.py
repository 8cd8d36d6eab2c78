"""containerd's gRPC services, one module each: thin translations over local stores."""
