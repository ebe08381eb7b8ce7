"""A run's plan before it starts: what it holds on the GPU and in host memory (memory.py), and the
rates its speed depends on (perf.py)."""
