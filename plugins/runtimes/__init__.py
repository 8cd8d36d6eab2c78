"""OCI runtime plugins: ``inprocess`` (Python, no runc binary) and the runc/crun CLI wrapper."""
