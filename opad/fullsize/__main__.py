import sys

from opad.fullsize import main

sys.exit(main())
