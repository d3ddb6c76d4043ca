#!/bin/sh
# Installs imagesync as systemd services, from this checkout. As root:
#
#   deploy/install.sh
#
#   /opt/imagesync/venv             a virtual environment holding imagesync (pip install of this checkout)
#   /etc/imagesync/imagesync.toml   the configuration: the sample, only if there is none yet
#   /etc/imagesync/imagesync.env    secrets for the units (FLOWER_BASIC_AUTH), mode 0600, only if none yet
#   /var/log/imagesync              the log folder
#   /etc/systemd/system/imagesync-*.service, enabled: control, beat, flower and
#                                   imagesync-worker@NODE for every configured node, or,
#                                   past 4 nodes reached over SSH, imagesync-nodes for all of
#                                   those (one worker, a pool of threads) and a worker@NODE
#                                   for each of the others
#
# Run it again after an upgrade or after changing the nodes: it reinstalls the
# package, keeps the configuration, enables the workers of new nodes and
# disables those of nodes no longer configured.
#
# DESTDIR=/some/dir installs under that folder instead of / (for tests and
# inspection): nothing outside it is touched, systemd is not asked to do
# anything, and the units are enabled there as symlinks (systemctl --root).
# The units still name /opt/imagesync, /etc/imagesync and /var/log/imagesync,
# and the venv only works where it was made: such a tree is not for copying to /.
set -eu

fail() {
    echo "install.sh: $*" >&2
    exit 1
}
say() {
    echo "install.sh: $*"
}

here=$(cd "$(dirname "$0")" && pwd)
source_dir=$(dirname "$here")
[ -f "$source_dir/pyproject.toml" ] || fail "run me from a checkout of imagesync: no pyproject.toml in $source_dir"

DESTDIR=${DESTDIR:-}
case $DESTDIR in
    ""|/*) ;;
    *) fail "DESTDIR must be an absolute path, not '$DESTDIR'" ;;
esac
DESTDIR=${DESTDIR%/}
if [ -z "$DESTDIR" ] && [ "$(id -u)" != 0 ]; then
    fail "run me as root (or set DESTDIR to install under another folder)"
fi

opt=$DESTDIR/opt/imagesync
venv=$opt/venv
etc=$DESTDIR/etc/imagesync
config=$etc/imagesync.toml
envfile=$etc/imagesync.env
logdir=$DESTDIR/var/log/imagesync
unitdir=$DESTDIR/etc/systemd/system
wants=$unitdir/multi-user.target.wants

apt_install() {
    command -v apt-get >/dev/null || fail "$1 is missing and there is no apt-get to install it: install $1"
    say "installing $* with apt-get"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

# 1. The venv: Debian 12's python3 is externally managed (PEP 668), so never
#    the system's site-packages; python3 -m venv needs python3-venv.
command -v python3 >/dev/null || apt_install python3
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c '' 2>/dev/null; then
    rm -rf "$venv"
    mkdir -p "$opt"
    if ! python3 -m venv "$venv" 2>/dev/null; then
        rm -rf "$venv"
        apt_install python3-venv
        python3 -m venv "$venv"
    fi
    say "made the virtual environment $venv"
fi
say "installing imagesync from $source_dir into $venv (pip)"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade "$source_dir" \
    || fail "pip install failed (see above); nothing else was changed"
"$venv/bin/imagesync" --version

# 2. Configuration, secrets, logs.
mkdir -p "$etc" "$logdir"
chmod 0755 "$etc" "$logdir"
install -m 0644 "$source_dir/imagesync.sample.toml" "$etc/imagesync.sample.toml"
fresh=no
if [ ! -e "$config" ]; then
    install -m 0640 "$source_dir/imagesync.sample.toml" "$config"
    fresh=yes
    say "wrote $config from the sample: edit it (nodes, prefixes, redis_url), then run me again"
else
    say "kept the configuration $config"
fi
if [ ! -e "$envfile" ]; then
    password=$("$venv/bin/python" -c 'import secrets; print(secrets.token_urlsafe(18))')
    (umask 077 && cat >"$envfile" <<EOF
# Environment of every imagesync unit (EnvironmentFile=), root-only: secrets
# and IMAGESYNC_* overrides of single configuration keys.
# Flower's login (imagesync-flower refuses to start without one):
FLOWER_BASIC_AUTH=admin:$password
# FLOWER_PORT=5555
# FLOWER_ADDRESS=127.0.0.1
EOF
    )
    say "wrote $envfile (mode 0600) with a Flower login, admin and a random password: read it there"
fi

# 3. The units.
mkdir -p "$unitdir"
for unit in "$here"/systemd/*.service; do
    install -m 0644 "$unit" "$unitdir/"
done
say "installed the units into $unitdir"

# 4. Which to enable: one worker per configured node, read by the installed imagesync;
#    past a handful of SSH nodes, one worker for all of them (memory: bench/README.md, 12).
HANDFUL=4
nodes=$(IMAGESYNC_CONFIG=$config HANDFUL=$HANDFUL "$venv/bin/python" -c '
import os
from imagesync.config import load_settings
nodes = load_settings().nodes
shared = sum(node.transport == "ssh" for node in nodes) > int(os.environ["HANDFUL"])
for node in nodes:
    print("+" if shared and node.transport == "ssh" else node.name)
') || {
    "$venv/bin/imagesync" --config "$config" config show >/dev/null || true
    fail "cannot read the nodes from $config (see above): fix it and run me again"
}
units="imagesync-control.service imagesync-beat.service imagesync-flower.service"
for node in $nodes; do
    case $node in
        +) case " $units " in *" imagesync-nodes.service "*) ;; *) units="$units imagesync-nodes.service" ;; esac ;;
        *) units="$units imagesync-worker@$node.service" ;;
    esac
done
stale=""
for link in "$wants"/imagesync-worker@*.service "$wants"/imagesync-nodes.service; do
    [ -e "$link" ] || [ -L "$link" ] || continue
    name=$(basename "$link")
    case " $units " in
        *" $name "*) ;;
        *) stale="$stale $name" ;;
    esac
done

if [ -z "$DESTDIR" ] && [ -d /run/systemd/system ]; then
    systemctl daemon-reload
    if [ -n "$stale" ]; then
        say "disabling and stopping the workers of nodes no longer configured:$stale"
        # shellcheck disable=SC2086
        systemctl disable --now $stale
    fi
    # shellcheck disable=SC2086
    systemctl enable $units
    if [ $fresh = yes ]; then
        say "enabled, not started (the configuration is the sample):"
        echo "  $units"
        say "edit $config, run me again, then: systemctl start $units"
    else
        # shellcheck disable=SC2086
        systemctl start $units
        say "enabled and started: $units"
        say "units that were already running keep the old code until: systemctl restart 'imagesync-*'"
    fi
elif command -v systemctl >/dev/null; then
    root=${DESTDIR:-/}
    if [ -z "$DESTDIR" ]; then
        say "systemd is not running (PID 1 is $(ps -o comm= -p 1 2>/dev/null || echo unknown)): enabling the units offline, as symlinks; not starting anything"
    else
        say "DESTDIR=$DESTDIR: enabling the units there, as symlinks; systemd is not asked to do anything"
    fi
    if [ -n "$stale" ]; then
        say "disabling the workers of nodes no longer configured:$stale"
        # shellcheck disable=SC2086
        systemctl --root="$root" --quiet disable $stale
    fi
    # shellcheck disable=SC2086
    systemctl --root="$root" --quiet enable $units 2>/dev/null
    say "enabled: $units"
    say "skipped: systemctl daemon-reload and start (once systemd runs: systemctl start $units)"
else
    say "no systemctl here: the units were not enabled; skipped: systemctl daemon-reload, enable, start"
    echo "  $units"
fi
