"""bench.worker: what a worker holds in memory (docs/worker.md); run as ``python -m bench.worker``."""
