"""A what-if for the benchmarks, never part of imagesync: with
``BENCH_WHATIF=no-holds-check``, pull tasks skip asking the node whether it
already holds the image before pulling it (``imagesync.pulls.holds``).

The benchmarks put this directory on the workers' PYTHONPATH to measure what
that check costs per pull; see bench/README.md.
"""

import os

if os.environ.get("BENCH_WHATIF") == "no-holds-check":
    import imagesync.pulls

    imagesync.pulls.holds = lambda settings, node, image: False
