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
