"""``python -m vdpasim``: the ``vdpasim`` command (how a supervised child process starts it, too)."""

import sys

from .cli import main

sys.exit(main())
