"""Built-in network plugins: none, host and cni."""
