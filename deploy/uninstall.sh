#!/bin/sh
# Removes what deploy/install.sh installed. As root:
#
#   deploy/uninstall.sh           stops and disables the imagesync units, removes
#                                 them and /opt/imagesync (the venv); keeps
#                                 /etc/imagesync and /var/log/imagesync
#   deploy/uninstall.sh --purge   also removes /etc/imagesync (configuration,
#                                 secrets) and /var/log/imagesync (logs, beat's
#                                 schedule file)
#
# Redis and its data (queues, run records, the lock) are not touched. Stopping
# a worker lets its running pulls finish first (up to TimeoutStopSec, 32 min).
# DESTDIR as for install.sh.
set -eu

fail() {
    echo "uninstall.sh: $*" >&2
    exit 1
}
say() {
    echo "uninstall.sh: $*"
}

purge=no
for arg in "$@"; do
    case $arg in
        --purge) purge=yes ;;
        -h|--help) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) fail "unknown argument '$arg': use --purge, or nothing" ;;
    esac
done

DESTDIR=${DESTDIR:-}
case $DESTDIR in
    ""|/*) ;;
    *) fail "DESTDIR must be an absolute path, not '$DESTDIR'" ;;
esac
DESTDIR=${DESTDIR%/}
if [ -z "$DESTDIR" ] && [ "$(id -u)" != 0 ]; then
    fail "run me as root (or set DESTDIR)"
fi

opt=$DESTDIR/opt/imagesync
etc=$DESTDIR/etc/imagesync
logdir=$DESTDIR/var/log/imagesync
unitdir=$DESTDIR/etc/systemd/system
wants=$unitdir/multi-user.target.wants

# Every imagesync unit: the unit files, and the enabled worker instances.
units=""
for path in "$unitdir"/imagesync-*.service "$wants"/imagesync-*.service; do
    [ -e "$path" ] || [ -L "$path" ] || continue
    name=$(basename "$path")
    [ "$name" = "imagesync-worker@.service" ] && continue
    case " $units " in
        *" $name "*) ;;
        *) units="$units $name" ;;
    esac
done

if [ -n "$units" ]; then
    if [ -z "$DESTDIR" ] && [ -d /run/systemd/system ]; then
        say "stopping and disabling:$units (running pulls finish first)"
        # shellcheck disable=SC2086
        systemctl disable --now $units || true
    elif command -v systemctl >/dev/null; then
        if [ -z "$DESTDIR" ]; then
            say "systemd is not running: disabling offline; skipped: systemctl stop and daemon-reload"
        fi
        # shellcheck disable=SC2086
        systemctl --root="${DESTDIR:-/}" --quiet disable $units 2>/dev/null || true
    else
        say "no systemctl here: skipped stopping and disabling$units"
    fi
fi
# Whatever symlinks systemctl left (or could not remove), then the unit files.
rm -f "$wants"/imagesync-*.service "$unitdir"/imagesync-*.service
rmdir "$wants" 2>/dev/null || true
if [ -z "$DESTDIR" ] && [ -d /run/systemd/system ]; then
    systemctl daemon-reload
    systemctl reset-failed 'imagesync-*' 2>/dev/null || true
fi
say "removed the units from $unitdir"

rm -rf "$opt"
say "removed $opt"

if [ $purge = yes ]; then
    rm -rf "$etc" "$logdir"
    say "removed $etc and $logdir (--purge)"
    say "a log_dir other than /var/log/imagesync in the configuration was not removed: remove it by hand"
else
    say "kept $etc and $logdir (--purge removes them too)"
fi
