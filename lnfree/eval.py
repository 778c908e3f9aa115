"""Entry point: `python -m lnfree.eval` (the code is in lnfree/analysis/evaluate.py)."""

from lnfree.analysis.evaluate import main

if __name__ == "__main__":
    main()
