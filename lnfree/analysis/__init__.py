"""Evaluation and analyses: metrics (pure functions on arrays), the evaluator behind `make eval`, tables,
plots, the data-scaling fit and the interpretability analyses (interp/)."""
