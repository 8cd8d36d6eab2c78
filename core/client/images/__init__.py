"""Image work a client does over berthd's (or containerd's) gRPC API: pull, push, unpack,
import and export archives, build a one-layer image from a root filesystem."""
