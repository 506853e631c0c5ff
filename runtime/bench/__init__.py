"""Benchmark instruments, never a product path: speed ratios (``speed``), the trainer's (``train``), and a
fixed-latency endpoint (``latency_server``)."""
