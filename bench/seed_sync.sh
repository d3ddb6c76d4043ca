#!/usr/bin/env bash
# What seed 000's image-sync does, as a pipeline, for the overhead benchmark
# (bench/overhead.py): one `ssh` per command, `crictl images -o json | jq` per
# node, the union of the images under the prefixes, and on each node
# `xargs -P MAX_PARALLEL ssh NODE timeout TIME_OUT crictl pull IMAGE` for what
# it lacks, logging each success or failure. The seed pulls node after node;
# here the nodes pull at the same time, as imagesync's do, so that only the
# cost of control differs.
#
# With RUNTIME=ctr, containerd's own client does the same: `ctr images ls -q`
# (filtered with awk) and `ctr images pull --hosts-dir DIR`.
#
# Settings come from the environment:
#   NODES         "HOST:PORT HOST:PORT ..." (sshd of each node, user root)
#   RUNTIME       crictl (default) or ctr;  HOSTS_DIRS  "DIR DIR ..." per node, for ctr
#   SSH_KEY       private key;  KNOWN_HOSTS  known_hosts file (checked strictly)
#   PREFIXES      "PREFIX PREFIX ..."
#   MAX_PARALLEL  pulls at once per node;  TIME_OUT  seconds per pull
#   LOG_DIR       where success_images.log and failed_images.log go
set -uo pipefail

ssh_opts=(-i "$SSH_KEY" -o BatchMode=yes -o IdentitiesOnly=yes -o ConnectTimeout=10
          -o UserKnownHostsFile="$KNOWN_HOSTS" -o GlobalKnownHostsFile=/dev/null
          -o StrictHostKeyChecking=yes -o LogLevel=ERROR)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$LOG_DIR"

RUNTIME=${RUNTIME:-crictl}
read -r -a hosts_dirs <<< "${HOSTS_DIRS:-}"
prefix_filter='[.images[].repoTags[]?] | map(. as $t | select(any($p[]; . as $x | $t | startswith($x + "/")))) | .[]'
prefix_json=$(printf '%s\n' $PREFIXES | jq -R . | jq -s -c .)

i=0
for node in $NODES; do
    i=$((i + 1))
    if [ "$RUNTIME" = ctr ]; then
        ssh "${ssh_opts[@]}" -p "${node##*:}" "root@${node%:*}" ctr -n k8s.io images ls -q \
            | awk -v p="$PREFIXES" 'BEGIN { n = split(p, ps, " ") }
                /^sha256:/ || /@/ { next }
                { for (j = 1; j <= n; j++) if (index($0, ps[j] "/") == 1) { print; next } }' \
            | sort -u > "$work/held.$i" \
            || { echo "ERROR: Cannot connect to $node via SSH" >&2; exit 1; }
    else
        ssh "${ssh_opts[@]}" -p "${node##*:}" "root@${node%:*}" crictl images -o json \
            | jq -r --argjson p "$prefix_json" "$prefix_filter" | sort -u > "$work/held.$i" \
            || { echo "ERROR: Cannot connect to $node via SSH" >&2; exit 1; }
    fi
done
sort -u "$work"/held.* > "$work/wanted"

export TIME_OUT LOG_DIR
export SSH_OPTS="${ssh_opts[*]}"
i=0
for node in $NODES; do
    i=$((i + 1))
    if [ "$RUNTIME" = ctr ]; then
        export PULL="ctr -n k8s.io images pull --hosts-dir ${hosts_dirs[$((i - 1))]}"
    else
        export PULL="crictl pull"
    fi
    comm -23 "$work/wanted" "$work/held.$i" | xargs -r -P "$MAX_PARALLEL" -I{} sh -c '
        if ssh $SSH_OPTS -p "$2" "root@$1" timeout "$TIME_OUT" $PULL "$3" > /dev/null 2>&1; then
            echo "$(date "+%F %T") node=$1:$2 image=$3 status=pulled" >> "$LOG_DIR/success_images.log"
        else
            echo "$(date "+%F %T") node=$1:$2 image=$3 status=failed" >> "$LOG_DIR/failed_images.log"
        fi' pull "${node%:*}" "${node##*:}" {} &
done
wait
