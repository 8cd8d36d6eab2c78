"""Client-side image library: references, platforms, manifests, pull, push, unpack,
import and export, over berthd's (or containerd's) gRPC API."""
