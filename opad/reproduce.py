"""``python -m opad.reproduce``: the command line of :mod:`opad.evaluation.reproduce`."""

import sys

from opad.evaluation.reproduce import main

if __name__ == "__main__":
    sys.exit(main())
