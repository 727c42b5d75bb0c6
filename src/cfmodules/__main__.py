"""``python -m cfmodules``: the command line (see :mod:`cfmodules.cli`)."""

import sys

from cfmodules.cli import main

sys.exit(main())
