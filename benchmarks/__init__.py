"""Side-by-side benchmarks of berthd against the real containerd."""
