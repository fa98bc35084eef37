"""``python -m srigl ...`` runs the ``srigl`` command line (see :mod:`srigl.app.cli`)."""

import sys

from srigl.app.cli import main

sys.exit(main())
