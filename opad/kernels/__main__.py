"""``python -m opad.kernels``: which implementation each accelerated op uses here, and why."""

import sys

from opad.errors import command_main
from opad.kernels.dispatch import report


@command_main()
def main(argv: list[str] | None = None) -> int:
    print(report())
    return 0


sys.exit(main())
