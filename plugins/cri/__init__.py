"""Kubernetes CRI (runtime.v1 RuntimeService and ImageService) on berth's services."""
