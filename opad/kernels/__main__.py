"""``python -m opad.kernels``: which implementation each accelerated op uses here, and why."""

import sys

from opad.errors import OpadError
from opad.kernels.dispatch import report

try:
    print(report())
except OpadError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
