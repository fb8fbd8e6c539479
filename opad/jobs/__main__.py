import sys

from opad.jobs.cli import main

sys.exit(main())
