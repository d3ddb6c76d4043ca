#!/bin/sh
# Starts one imagesync process in its container:
#   IMAGESYNC_ROLE=control            the control worker (sync, housekeeping)
#   IMAGESYNC_NODE=NAME (role "node") the worker of node NAME (its pulls)
#   IMAGESYNC_ROLE=nodes              one worker for every SSH node (imagesync worker --all-nodes)
#   IMAGESYNC_ROLE=beat               celery beat (beat/entrypoint.sh sets this)
#   IMAGESYNC_ROLE=agent              imagesync agent: this node's worker, on the node (NODE_NAME, else the host name)
# Arguments go on to `celery worker` (or `celery beat`). With --healthcheck as its only argument
# it pings this container's worker instead (the image's HEALTHCHECK).
set -eu

fail() {
    echo "imagesync: $*" >&2
    exit 2  # the CLI's exit code for configuration errors
}

role=${IMAGESYNC_ROLE:-node}
node=${IMAGESYNC_NODE:-}
# These two belong to the container, not to the configuration, and imagesync
# refuses IMAGESYNC_* variables it does not know (a misspelt override must not
# pass silently): keep them out of the environment of what runs next.
unset IMAGESYNC_ROLE IMAGESYNC_NODE

# The Celery node name, as `imagesync worker` chooses it: -n NAME@%h.
case $role in
    control|beat|nodes) name=$role ;;
    agent) [ -n "${NODE_NAME:-}" ] || unset NODE_NAME
           # an empty address is no setting: the agent then finds one itself
           [ -n "${IMAGESYNC_AGENT_PEER_ADVERTISE:-}" ] || unset IMAGESYNC_AGENT_PEER_ADVERTISE
           name=${NODE_NAME:-${HOSTNAME:-$(hostname)}} ;;
    node) [ -n "$node" ] || fail "set IMAGESYNC_NODE to the node this worker serves (or IMAGESYNC_ROLE=control)"
          name=$node ;;
    *) fail "IMAGESYNC_ROLE is '$role': use 'node' (with IMAGESYNC_NODE), 'nodes', 'control', 'agent' or 'beat'" ;;
esac

if [ "$*" = --healthcheck ]; then
    # Docker reads 1 as unhealthy; celery exits 69 when no worker answers.
    celery -A imagesync inspect ping --timeout 10 --destination "$name@${HOSTNAME:-$(hostname)}" || exit 1
    exit 0
fi

config=${IMAGESYNC_CONFIG:-/etc/imagesync/imagesync.toml}
if [ -d "$config" ]; then
    # What Docker leaves when the bind-mounted file did not exist on the host.
    fail "$config is a directory, not the configuration file: remove ./imagesync.toml and run 'cp imagesync.sample.toml imagesync.toml'"
elif [ ! -e "$config" ]; then
    fail "no configuration file at $config: mount one (cp imagesync.sample.toml imagesync.toml) or set IMAGESYNC_CONFIG"
elif [ ! -r "$config" ]; then
    fail "cannot read $config as uid $(id -u): make it readable (chmod a+r imagesync.toml)"
fi
# paramiko, unlike ssh, does not mind a key readable by others, but it must
# be readable by this container's user, which is rarely the key's owner.
key=${IMAGESYNC_SSH_KEY_FILE:-}
if [ -n "$key" ] && [ -e "$key" ] && [ ! -r "$key" ]; then
    fail "cannot read the SSH key $key as uid $(id -u): chown $(id -u) ssh/id_ed25519 on the host"
fi

case $role in
    control) exec imagesync worker --control -- "$@" ;;
    agent) exec imagesync agent -- "$@" ;;
    # a Celery name of its own, which the healthcheck pings (else: the first node's +N)
    nodes) exec imagesync worker --all-nodes -- -n "nodes@%h" "$@" ;;
    beat) exec imagesync beat -- "$@" ;;
esac
exec imagesync worker --node "$node" -- "$@"
