"""Entry point: `python -m lnfree.train` (the code is in lnfree/training/train.py)."""

from lnfree.training.train import main

if __name__ == "__main__":
    main()
