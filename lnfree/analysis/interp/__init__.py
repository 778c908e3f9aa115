"""Interpretability analyses that LN-free models make exact (../INTERP.md-style, on plain HF GPT-2 hooks)."""
