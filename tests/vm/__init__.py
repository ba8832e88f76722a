"""Kernel-level tests: they run inside the lab VM (see docs/kernel-lab.md and tests/vm/conftest.py)."""
