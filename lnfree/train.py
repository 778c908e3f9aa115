"""Entry point: `python -m lnfree.train` (the code is in lnfree/training/run.py)."""

from lnfree.extras import require

require("train", "lnfree train")  # without Lightning: one line that says what to install, not a traceback

from lnfree.training.run import main  # noqa: E402

if __name__ == "__main__":
    main()
