"""The event bus: containerd's topics and envelopes, plus a durable, sequenced log."""
