"""``python -m imagesync.worker [OPTIONS]``: a Celery worker of imagesync's app,
with the options of ``celery -A imagesync worker``.

``imagesync worker`` starts this rather than ``celery -A imagesync worker``:
Celery's command line imports every command it has and its plugins (Flower,
with Tornado and prometheus_client; the REPL's prompt_toolkit), some 300
modules and 14 MiB that a worker never uses and that every node's worker
would hold. This imports the worker command alone.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    from celery.bin.base import CLIContext
    from celery.bin.worker import worker

    from .celery import app

    context = CLIContext(app=app, no_color=None, workdir=None)
    args = list(sys.argv[1:] if argv is None else argv)
    worker.main(args=args, prog_name="imagesync-worker", obj=context)  # exits
    return 0


if __name__ == "__main__":
    sys.exit(main())
