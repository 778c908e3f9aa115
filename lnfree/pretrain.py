"""Entry point: `python -m lnfree.pretrain` (the code is in lnfree/training/pretrain.py)."""

from lnfree.training.pretrain import main

if __name__ == "__main__":
    main()
