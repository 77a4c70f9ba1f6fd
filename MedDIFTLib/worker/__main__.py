"""``python -m MedDIFTLib.worker``: the background worker on stdin/stdout (see :mod:`.server`)."""

from .server import exit_now, main

exit_now(main())
