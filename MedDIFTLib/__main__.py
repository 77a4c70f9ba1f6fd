"""``python -m MedDIFTLib`` runs the ``meddift`` command line."""

import sys

from .cli import main

sys.exit(main())
