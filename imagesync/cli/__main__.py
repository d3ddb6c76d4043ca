"""``python -m imagesync.cli``: the ``imagesync`` command, as the console script runs it."""

import sys

from . import main

sys.exit(main())
