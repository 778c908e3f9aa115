"""Interpretability analyses that LN-free models make exact (docs/interpretability.md), on HF GPT-2 hooks."""
