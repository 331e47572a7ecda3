#!/usr/bin/env bash
# Builds the local sandbox image agentfleet/sandbox:<tag> if it is missing.
#
# No registry is reachable, so the image is a Debian bookworm minbase rootfs made with
# debootstrap and imported with `docker import`. The tag is a hash of this script and of
# every file under deploy/sandbox/, so a changed recipe builds a new image. The image is
# also tagged agentfleet/sandbox:current, the default of SandboxConfig::image.
#
# Usage: deploy/sandbox-image.sh [--force]
#   --force  rebuild even if the image exists.
# Prints progress on stderr and the image name as the last line of stdout.
# Safe to run concurrently (flock); must run as root (debootstrap).
set -euo pipefail

force=0
for arg in "$@"; do
  case "$arg" in
    --force) force=1 ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "sandbox-image: unknown argument '$arg' (only --force)" >&2; exit 64 ;;
  esac
done

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="agentfleet/sandbox"
log() { echo "sandbox-image: $*" >&2; }

# The recipe: this script plus deploy/sandbox/*, in a stable order.
tag="$( { cat "$here/sandbox-image.sh"
          if [ -d "$here/sandbox" ]; then
            find "$here/sandbox" -type f -print0 | LC_ALL=C sort -z | xargs -0 -r sha256sum | sed "s|$here/||"
          fi; } | sha256sum | cut -c1-12)"
image="$repo:$tag"

command -v docker >/dev/null || { log "docker CLI not found; install docker.io"; exit 69; }
docker info >/dev/null 2>&1 || { log "cannot reach the Docker engine; is it running? (/var/run/docker.sock)"; exit 69; }

# One builder at a time; the others wait, then find the image built.
# The lock lives where only root (or this user) can create files: a predictable name in a
# world-writable /tmp could be a symlink planted by someone else.
lock_dir=/run/lock
[ -d "$lock_dir" ] && [ -w "$lock_dir" ] || lock_dir="${XDG_RUNTIME_DIR:-$HOME}"
exec 9>"$lock_dir/agentfleet-sandbox-image.lock"
flock 9

if [ "$force" = 0 ] && docker image inspect "$image" >/dev/null 2>&1; then
  docker tag "$image" "$repo:current"
  echo "$image"
  exit 0
fi

[ "$(id -u)" = 0 ] || { log "debootstrap needs root; run as root (or sudo)"; exit 77; }
export DEBIAN_FRONTEND=noninteractive
if ! command -v debootstrap >/dev/null; then
  log "installing debootstrap"
  apt-get install -y -q debootstrap >&2 || { apt-get update -q >&2 && apt-get install -y -q debootstrap >&2; }
fi

# The mirror this machine's apt already uses (deb822 first, then one-line format).
mirror=""
if compgen -G "/etc/apt/sources.list.d/*.sources" >/dev/null; then
  mirror="$(awk '/^URIs:/ {for (i = 2; i <= NF; i++) print $i}' /etc/apt/sources.list.d/*.sources \
            | grep -v -e security -e updates | head -n1 || true)"
fi
if [ -z "$mirror" ] && [ -f /etc/apt/sources.list ]; then
  mirror="$(awk '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i ~ /^(https?|file):/) { print $i; break } }' \
            /etc/apt/sources.list | grep -v security | head -n1 || true)"
fi
mirror="${mirror:-http://deb.debian.org/debian}"

work="$(mktemp -d /var/tmp/agentfleet-sandbox.XXXXXX)"
cleanup() { rm -rf --one-file-system "$work"; }
trap cleanup EXIT
rootfs="$work/rootfs"

start=$(date +%s)
log "building $image from $mirror (debootstrap minbase bookworm)"
debootstrap --variant=minbase --include=python3-minimal,python3,python3-pip bookworm "$rootfs" "$mirror" >&2

# The unprivileged user every sandbox runs as, and the mount point of the workspace.
chroot "$rootfs" /usr/sbin/groupadd --gid 10001 sandbox
chroot "$rootfs" /usr/sbin/useradd --uid 10001 --gid 10001 --no-create-home --home-dir /workspace \
  --shell /bin/sh sandbox
install -d -m 0755 -o 10001 -g 10001 "$rootfs/workspace"

# Nothing a test run needs: package caches, docs, man pages.
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* \
       "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/*

tar --numeric-owner -C "$rootfs" -c . \
  | docker import \
      --change 'USER 10001' \
      --change 'WORKDIR /workspace' \
      --change 'ENV HOME=/tmp' \
      --change "LABEL agentfleet.sandbox.recipe=$tag" \
      - "$image" >&2
docker tag "$image" "$repo:current"
log "built $image in $(( $(date +%s) - start ))s"
echo "$image"
