"""A what-if for the benchmarks, never part of imagesync: with
``BENCH_WHATIF=always-check``, every pull asks the node first whether it
already holds the image (in the same node-side command), as a redelivered or
retried pull does, instead of only pulls that may be stale.

The benchmarks put this directory on the workers' PYTHONPATH to measure what
that check costs per pull; see bench/README.md.
"""

import os

if os.environ.get("BENCH_WHATIF") == "always-check":
    import imagesync.pulls

    # before imagesync.tasks imports it by name
    imagesync.pulls.needs_check = lambda *args, **kwargs: True

# The memory benchmark's what-ifs (comma-separated, so several undo together):
# ``no-freeze`` keeps a worker from freezing its objects before it forks its
# pool (imagesync.workerhooks._freeze_before_fork), to measure what that saves.
if "no-freeze" in os.environ.get("BENCH_WHATIF", "").split(","):
    import gc

    gc.freeze = lambda: None

# ``prefetch-2``: each worker takes two messages per pool process off its queue
# instead of one, so that the next pull is in the worker before the current one
# ends; to measure what an idle slot between pulls costs (bench/README.md, 0).
if "prefetch-2" in os.environ.get("BENCH_WHATIF", "").split(","):
    import imagesync.celeryconfig

    _celery_settings = imagesync.celeryconfig.celery_settings

    def _prefetching(settings):  # type: ignore[no-untyped-def]
        return {**_celery_settings(settings), "worker_prefetch_multiplier": 2}

    imagesync.celeryconfig.celery_settings = _prefetching
