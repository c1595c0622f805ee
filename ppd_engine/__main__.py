"""`python -m ppd_engine [command …]`: the same as the `ppd` console script."""

import sys

from ppd_engine.cli import main

sys.exit(main())
