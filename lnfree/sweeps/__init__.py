"""Orchestration of the studies: sweeps that train only what their records lack."""
