"""``python -m opad.evaluate``: the command line of :mod:`opad.evaluation.evaluate`."""

import sys

from opad.evaluation.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
