"""imagesync: keep container images in sync across Kubernetes worker nodes.

``celery -A imagesync`` finds the Celery app in :mod:`imagesync.celery`; this
module imports nothing, so that the CLI and the tests can load the pure parts
(configuration, references, planning) without a configuration file.
"""

__version__ = "0.1.0"
