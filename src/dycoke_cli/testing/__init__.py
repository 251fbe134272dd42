"""Support for tests, benchmarks and training scripts, not used by the product: tiny checkpoints
built from configs (tiny.py). Nothing here downloads anything."""
