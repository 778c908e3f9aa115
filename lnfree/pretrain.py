"""Entry point: `python -m lnfree.pretrain` (the code is in lnfree/training/pretrain_run.py)."""

from lnfree.extras import require

require("train", "lnfree pretrain")  # without Lightning: one line that says what to install, not a traceback

from lnfree.training.pretrain_run import main  # noqa: E402

if __name__ == "__main__":
    main()
