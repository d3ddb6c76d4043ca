"""The one configuration loader: read the file, apply the environment, validate.

imagesync reads one file: the path it is given, else ``$IMAGESYNC_CONFIG``,
else ``/etc/imagesync/imagesync.toml``, in TOML (``imagesync.sample.toml``
documents every key) or in the seed tool's ``image-sync.conf`` format.
``IMAGESYNC_*`` environment variables then override single keys; precedence,
highest first: environment, file, default.  :func:`load_settings` raises one
:class:`~imagesync.errors.ConfigError` listing every problem found, one line
each, and no other exception.

The package has one module per job:

* :mod:`.model`: the settings model (:class:`Settings`, :class:`Node`,
  :class:`SSHSettings`, :class:`RegistryLogin`) and its validators;
* :mod:`.images`: the image tables (:class:`ImageEntry`) and the reader of
  ``images_file``, seed 003's ``image.config``;
* :mod:`.show`: the rows of ``config show``;
* :mod:`.checks`: the checks of single values the model's fields use, and
  how values are shown in problems (:func:`mask_url`);
* :mod:`.sources`: reading the TOML file and the environment, precedence and
  provenance (what ``config show`` prints), and :func:`load_settings`;
* :mod:`.shellconf`: the reader of the seed tool's ``image-sync.conf``;
* :mod:`.sshconfig`: the operator's OpenSSH client configuration, and how
  each node is reached over SSH (:meth:`Settings.ssh_target`);
* :mod:`.problems`: pydantic's validation errors as one-line problems.

Import from here, not from the modules: they are an internal layout.
"""

from .checks import Location, mask_url
from .model import HostKeyPolicy, Node, RegistryLogin, Runtime, Settings, SSHSettings, Transport
from .shellconf import LEGACY_KEYS
from .sources import CONFIG_VARIABLE, DEFAULT_CONFIG_PATH, ENVIRONMENT, load_settings
from .sshtargets import SSHTarget, forgetful_accept_new, keeps_nothing

__all__ = [
    "CONFIG_VARIABLE",
    "DEFAULT_CONFIG_PATH",
    "ENVIRONMENT",
    "LEGACY_KEYS",
    "HostKeyPolicy",
    "Location",
    "Node",
    "RegistryLogin",
    "Runtime",
    "SSHSettings",
    "SSHTarget",
    "Settings",
    "Transport",
    "forgetful_accept_new",
    "keeps_nothing",
    "load_settings",
    "mask_url",
]
