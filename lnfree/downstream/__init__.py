"""Downstream evaluation through lm-evaluation-harness: tasks shipped with lnfree (built from the built-in
validation text, run offline) and the paper's hub tasks (HellaSwag, MMLU, Pile-10k) by a config change."""
