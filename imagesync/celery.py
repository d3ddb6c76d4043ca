"""The Celery app, found by ``celery -A imagesync worker|beat|flower|call``.

Configuration is read once, here; a process with an invalid configuration
prints every problem and exits 2 before it starts anything (the OpenSSH client
configuration included). A command that only sends tasks uses
:func:`imagesync.celeryconfig.client_app` instead.
"""

from __future__ import annotations

import sys
from typing import NoReturn

from celery import Celery

from .agents import serving
from .celeryconfig import celery_settings
from .config import load_settings
from .errors import ConfigError


def refuse(error: ConfigError) -> NoReturn:
    """Print every problem of the configuration and exit 2."""
    for problem in error.problems:
        print(f"imagesync: {problem}", file=sys.stderr)
    raise SystemExit(2)


try:
    # a worker started by `imagesync agent` also knows the node it serves (imagesync.agents)
    settings = serving(load_settings())
except ConfigError as exc:
    refuse(exc)

app = Celery("imagesync", include=["imagesync.tasks"])
app.conf.update(celery_settings(settings))
