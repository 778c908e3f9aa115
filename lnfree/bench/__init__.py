"""Benchmarks (not tests): removal-machinery cost and LN-free speed on CPU (cpu), the GPU check (gpu), and a
host-sync counter (syncs)."""
