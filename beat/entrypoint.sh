#!/bin/sh
# Starts celery beat: the sync schedule from the configuration, and the check
# for stale runs every 30 s. Run exactly one: two beats trigger everything
# twice. Its schedule file is log_dir/beat-schedule, on the logs volume, so a
# restart does not forget when each entry last ran. Arguments go on to
# `celery beat`.
set -eu

fail() {
    echo "imagesync: $*" >&2
    exit 2  # the CLI's exit code for configuration errors
}

config=${IMAGESYNC_CONFIG:-/etc/imagesync/imagesync.toml}
if [ -d "$config" ]; then
    # What Docker leaves when the bind-mounted file did not exist on the host.
    fail "$config is a directory, not the configuration file: remove ./imagesync.toml and run 'cp imagesync.sample.toml imagesync.toml'"
elif [ ! -e "$config" ]; then
    fail "no configuration file at $config: mount one (cp imagesync.sample.toml imagesync.toml) or set IMAGESYNC_CONFIG"
elif [ ! -r "$config" ]; then
    fail "cannot read $config as uid $(id -u): make it readable (chmod a+r imagesync.toml)"
fi

exec imagesync beat -- "$@"
