"""`python -m cometjax.cli ...` runs the command line."""

import sys

from cometjax.cli import main

sys.exit(main())
