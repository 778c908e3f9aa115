"""Entry point: `python -m lnfree.eval` (the code is in lnfree/analysis/compare.py)."""

import sys

from lnfree.extras import require

require("analysis", "lnfree eval")  # without Hydra or scipy: one line that says what to install, not a traceback

from lnfree.analysis.compare import main, positional_hint  # noqa: E402

if __name__ == "__main__":
    if hint := positional_hint(sys.argv[1:]):  # a model path where Hydra wants key=value: say the form that works
        print(f"[lnfree] {hint}", file=sys.stderr)
        sys.exit(2)
    main()
