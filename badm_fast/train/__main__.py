"""``python -m badm_fast.train ...``: the same as ``badm-train ...``."""

import sys

from badm_fast.train.cli import main

if __name__ == "__main__":
    sys.exit(main())
