"""``python -m opad.tiny OUT_DIR``: the command line of :mod:`opad.presets.tiny`."""

import sys

from opad.presets.tiny import main

if __name__ == "__main__":
    sys.exit(main())
