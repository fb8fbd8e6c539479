import sys

from opad.train.cli import main

sys.exit(main())
