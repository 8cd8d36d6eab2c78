"""Server-side image transfers (trio): what berthd itself fetches into its local stores.

The client library (``berth.core.images``, asyncio) pulls through berthd's gRPC API; the
code here pulls from inside berthd, straight into the content store, the snapshotters
and the image store, for the CRI plugin and for any transfer-like service after it.
"""
