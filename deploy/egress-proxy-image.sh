#!/usr/bin/env bash
# Builds the local egress proxy image agentfleet/egress-proxy:<tag> if it is missing: squid
# from Debian's packages on the sandbox base image (deploy/sandbox-image.sh builds that
# first). The tag is a hash of this script, deploy/egress-proxy/* and the base image's id,
# so a changed recipe or base builds a new image; it is also tagged :current.
#
# Usage: deploy/egress-proxy-image.sh [--force]
# Prints progress on stderr and the image name as the last line of stdout.
set -euo pipefail

force=0
for arg in "$@"; do
  case "$arg" in
    --force) force=1 ;;
    -h|--help) sed -n '2,8p' "$0"; exit 0 ;;
    *) echo "egress-proxy-image: unknown argument '$arg' (only --force)" >&2; exit 64 ;;
  esac
done
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
log() { echo "egress-proxy-image: $*" >&2; }
command -v docker >/dev/null || { log "docker CLI not found; install docker.io"; exit 69; }
docker info >/dev/null 2>&1 || { log "cannot reach the Docker engine; is it running?"; exit 69; }

base="$("$here/sandbox-image.sh" | tail -n 1)"
base_id="$(docker image inspect --format '{{.Id}}' "$base")"
tag="$( { cat "$here/egress-proxy-image.sh" "$here/egress-proxy/Dockerfile"; echo "$base_id"; } | sha256sum | cut -c1-12)"
image="agentfleet/egress-proxy:$tag"

lock_dir=/run/lock
[ -d "$lock_dir" ] && [ -w "$lock_dir" ] || lock_dir="${XDG_RUNTIME_DIR:-$HOME}"
exec 9>"$lock_dir/agentfleet-egress-proxy-image.lock"
flock 9
if [ "$force" = 0 ] && docker image inspect "$image" >/dev/null 2>&1; then
  docker tag "$image" agentfleet/egress-proxy:current
  echo "$image"
  exit 0
fi
start=$(date +%s)
log "building $image on $base (squid from Debian's packages)"
docker build -q --build-arg "BASE=$base" -t "$image" "$here/egress-proxy" >&2
docker tag "$image" agentfleet/egress-proxy:current
log "built $image in $(( $(date +%s) - start ))s"
echo "$image"
