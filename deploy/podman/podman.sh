#!/usr/bin/env bash
# podman with the project's own settings and image store, never the machine's /etc/containers or
# /var/lib/containers:  deploy/podman/podman.sh images   (any podman subcommand and its flags).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
export CONTAINERS_CONF="$here/containers.conf"
export CONTAINERS_STORAGE_CONF="$here/storage.conf"
# The project's containers.conf caps nofile at 20000; a machine with a lower hard limit gets its own.
hard_nofile="$(ulimit -Hn)"
if [[ "$hard_nofile" != unlimited && "$hard_nofile" -lt 20000 && "${1:-}" =~ ^(run|build|create)$ ]]; then
  set -- "$1" --ulimit "nofile=$hard_nofile:$hard_nofile" "${@:2}"
fi
exec podman --root "$repo/.tools/podman/storage" --runroot "${TMPDIR:-/tmp}/cascade-podman-run" "$@"
