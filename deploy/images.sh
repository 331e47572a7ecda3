#!/usr/bin/env bash
# Builds the fleet's container images locally, one per binary plus Redis and Postgres:
#
#   agentfleet/orchestrator  agentfleet/outbox-relay  agentfleet/budget  agentfleet/fleetctl
#   agentfleet/dev-worker  agentfleet/qa-worker  agentfleet/review-worker
#   agentfleet/refactor-worker  agentfleet/redis  agentfleet/postgres
#
# No registry is reachable, so every image is `FROM scratch` with a root filesystem
# assembled here: our binary, exactly the shared libraries `ldd` says it loads (from this
# machine's Debian packages), the CA bundle, a passwd/group naming the unprivileged user
# 65532, and the fleet's default config files. Images that run git (orchestrator, workers)
# also get git with its helpers and dash, because git runs some of its work through
# /bin/sh; no other image has a shell. Redis and Postgres come from Debian's redis-server
# and postgresql-15 packages the same way; Postgres gets dash for its first-start script.
#
# Each image is tagged with a hash of its root filesystem's contents and re-tagged
# `current`; an image whose hash exists already is not rebuilt, so a second run only
# rebuilds what changed.
#
# Usage: deploy/images.sh [--profile release|dev] [--force] [NAME...]
#   --profile  cargo profile of the binaries [release: LTO, the tuned one]; `dev` reuses
#              the test suite's build (what CI's container tests use).
#   --force    rebuild images that exist.
#   NAME...    only these images (default: all).
# Prints progress on stderr and one line per image, `NAME IMAGE SIZE`, on stdout.
# Exit codes: 64 bad arguments, 69 Docker or a package missing, 1 a build failed.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo_root="$(dirname "$here")"
profile=release
force=0
only=()
while [ $# -gt 0 ]; do
    case "$1" in
        --profile) [ $# -ge 2 ] || { echo "images: --profile needs release or dev" >&2; exit 64; }
                   profile=$2; shift ;;
        --force) force=1 ;;
        -h|--help) sed -n '2,27p' "$0"; exit 0 ;;
        -*) echo "images: unknown option '$1' (see --help)" >&2; exit 64 ;;
        *) only+=("$1") ;;
    esac
    shift
done
case "$profile" in
    release) target_dir=release ;;
    dev) target_dir=debug ;;
    *) echo "images: --profile must be release or dev, not '$profile'" >&2; exit 64 ;;
esac

log() { echo "images: $*" >&2; }
binaries=(orchestrator outbox-relay budget fleetctl dev-worker qa-worker review-worker refactor-worker sandbox-runner)
all=("${binaries[@]}" redis postgres)
if [ "${#only[@]}" -eq 0 ]; then only=("${all[@]}"); fi
for name in "${only[@]}"; do
    [[ " ${all[*]} " == *" $name "* ]] || { echo "images: unknown image '$name' (one of: ${all[*]})" >&2; exit 64; }
done
wanted() { [[ " ${only[*]} " == *" $1 "* ]]; }

command -v docker >/dev/null || { log "docker CLI not found; install docker.io"; exit 69; }
docker info >/dev/null 2>&1 || { log "cannot reach the Docker engine; is it running?"; exit 69; }
pg_version=15
need_packages=()
[ -f /etc/ssl/certs/ca-certificates.crt ] || need_packages+=(ca-certificates)
command -v git >/dev/null || need_packages+=(git)
if wanted redis; then command -v redis-server >/dev/null || need_packages+=(redis-server); fi
if wanted postgres; then [ -x /usr/lib/postgresql/$pg_version/bin/postgres ] || need_packages+=(postgresql-$pg_version); fi
[ -x /bin/dash ] || need_packages+=(dash)
if [ "${#need_packages[@]}" -gt 0 ]; then
    [ "$(id -u)" = 0 ] || { log "missing Debian packages ${need_packages[*]}: install them (apt-get install)"; exit 69; }
    log "installing ${need_packages[*]} (apt-get)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need_packages[@]}" >&2 \
        || { apt-get update -q >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need_packages[@]}" >&2; }
fi

work="$(mktemp -d /var/tmp/agentfleet-images.XXXXXX)"
trap 'rm -rf --one-file-system "$work"' EXIT

# Copies $2 into rootfs $1 at the same path (cp's own --parents is not used: coreutils 9.1
# fails with it on some file systems). Extra cp options follow.
copy_to() {
    local root=$1 path=$2
    shift 2
    mkdir -p "$root$(dirname "$path")"
    cp -a "$@" "$path" "$root$path"
}

# Copies the shared libraries file $2 loads into rootfs $1, at the paths the loader looks
# them up by (dereferenced: `ldd` lists the loader and each resolved library).
libs_of() {
    local root=$1 file=$2 lib
    while read -r lib; do
        [ -n "$lib" ] && [ ! -e "$root$lib" ] && copy_to "$root" "$lib" -L
    done < <(ldd "$file" 2>/dev/null | awk '/=> \// { print $3 } /^[[:space:]]*\/[^ ]*ld-linux/ { print $1 }')
    return 0
}

# Copies files and directories into rootfs $1 at their own paths, with every shared
# library any executable or library among them loads.
with_libs() {
    local root=$1 path f
    shift
    for path in "$@"; do
        copy_to "$root" "$path"
        while IFS= read -r -d '' f; do
            libs_of "$root" "$f"
        done < <(find "$path" -type f \( -perm -u+x -o -name '*.so*' \) -print0)
    done
}

# The parts every image has: users, name resolution, the CA bundle, a writable /tmp mount point.
base_rootfs() {
    local root=$1 user=$2 home=$3 uid=${4:-65532}
    mkdir -p "$root/etc/ssl/certs" "$root/tmp" "$root$home"
    printf 'root:x:0:0:root:/root:/nonexistent\n%s:x:%s:%s:%s:%s:/nonexistent\n' "$user" "$uid" "$uid" "$user" "$home" >"$root/etc/passwd"
    printf 'root:x:0:\n%s:x:%s:\n' "$user" "$uid" >"$root/etc/group"
    printf 'passwd: files\ngroup: files\nhosts: files dns\n' >"$root/etc/nsswitch.conf"
    cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/"
    chmod 1777 "$root/tmp"
    chown "$uid:$uid" "$root$home"
}

# Imports rootfs dir $2 as image $1 with the image settings in the remaining arguments
# (`docker import --change` lines), unless an image of the same hash exists. `docker
# import` rather than a Dockerfile's COPY, which would hand every file to root: the
# users' home and data directories must stay theirs.
build() {
    local name=$1 root=$2 hash image
    shift 2
    local changes=("$@") change_args=()
    for c in "${changes[@]}"; do change_args+=(--change "$c"); done
    # The tag: every file's path, mode, owner and contents, and the image settings.
    hash="$( { (cd "$root" && find . -print0 | LC_ALL=C sort -z | xargs -0 stat -c '%n %a %u:%g %F'
                cd "$root" && find . -type f -print0 | LC_ALL=C sort -z | xargs -0 -r sha256sum)
               printf '%s\n' "${changes[@]}"; } | sha256sum | cut -c1-12)"
    image="agentfleet/$name:$hash"
    if [ "$force" = 1 ] || ! docker image inspect "$image" >/dev/null 2>&1; then
        log "building $image"
        tar -C "$root" --sort=name --mtime=@0 --numeric-owner -cf - . \
            | docker import "${change_args[@]}" - "$image" >/dev/null
    else
        log "$image is up to date"
    fi
    docker tag "$image" "agentfleet/$name:current"
    printf '%s %s %s\n' "$name" "$image" "$(docker image inspect -f '{{.Size}}' "$image")"
}

label='LABEL org.opencontainers.image.source=agentfleet org.opencontainers.image.licenses=Apache-2.0'

# 1. Our binaries.
crates=()
for name in "${binaries[@]}"; do
    if wanted "$name"; then
        case "$name" in
            *-worker|sandbox-runner) [[ " ${crates[*]} " == *" workers "* ]] || crates+=(-p workers) ;;
            *) crates+=(-p "$name") ;;
        esac
    fi
done
if [ "${#crates[@]}" -gt 0 ]; then
    log "cargo build --profile $profile ${crates[*]}"
    (cd "$repo_root" && cargo build --locked -q --profile "$profile" "${crates[@]}")
fi
for name in "${binaries[@]}"; do
    wanted "$name" || continue
    root="$work/rootfs-$name"
    # The runner is another user than the workers: it owns the workspace root, which the
    # workers must not be able to change (workers::runner).
    if [ "$name" = sandbox-runner ]; then uid=65533; else uid=65532; fi
    base_rootfs "$root" fleet /home/fleet "$uid"
    mkdir -p "$root/usr/local/bin" "$root/etc/agentfleet/config"
    # Stripped: the images carry no debugger, and symbols are most of a binary's size.
    objcopy --strip-all "$repo_root/target/$target_dir/$name" "$root/usr/local/bin/$name"
    libs_of "$root" "$root/usr/local/bin/$name"
    cp "$repo_root/config/permissions.toml" "$repo_root/config/risk_matrix.toml" "$root/etc/agentfleet/config/"
    case "$name" in
        orchestrator|*-worker)
            # git, its helpers (clone and push run git-remote-https, git-upload-pack…) and
            # the shell git hands some commands to.
            with_libs "$root" /usr/bin/git /usr/lib/git-core /usr/share/git-core/templates /bin/dash
            ln -s dash "$root/bin/sh"
            mkdir -p "$root/workspace" && chown 65532:65532 "$root/workspace"
            ;;
        sandbox-runner)
            # The socket's directory: a volume shared with the workers starts as this.
            mkdir -p "$root/run/agentfleet" && chown "$uid:$uid" "$root/run/agentfleet"
            ;;
    esac
    build "$name" "$root" "$label" "USER $uid:$uid" 'WORKDIR /etc/agentfleet' \
        'ENV PATH=/usr/local/bin:/usr/bin:/bin' 'ENV HOME=/home/fleet' "ENTRYPOINT [\"/usr/local/bin/$name\"]"
done

# 2. Redis, from Debian's redis-server. Configuration comes as arguments or a mounted file.
if wanted redis; then
    root="$work/rootfs-redis"
    base_rootfs "$root" redis /data
    # Debian's redis-server is a symlink to one binary that acts on the name it is run by.
    real=$(readlink -f "$(command -v redis-server)")
    # redis-cli for the health check (a TLS PING: NOAUTH is an answer too).
    with_libs "$root" "$real" "$(command -v redis-cli)"
    [ "$real" = /usr/bin/redis-server ] || ln -s "$(basename "$real")" "$root/usr/bin/redis-server"
    build redis "$root" "$label" 'USER 65532:65532' 'WORKDIR /data' 'VOLUME /data' 'EXPOSE 6379' \
        'ENTRYPOINT ["/usr/bin/redis-server"]'
fi

# 3. Postgres, from Debian's postgresql-15, with a first-start script (deploy/postgres/).
if wanted postgres; then
    root="$work/rootfs-postgres"
    base_rootfs "$root" postgres /var/lib/postgresql
    pg=/usr/lib/postgresql/$pg_version
    # The server's modules but the LLVM JIT (with libLLVM it would triple the image; JIT is
    # off without it).
    mapfile -t modules < <(find "$pg/lib" -maxdepth 1 -name '*.so' ! -name 'llvmjit*')
    with_libs "$root" "$pg/bin/postgres" "$pg/bin/initdb" "$pg/bin/pg_ctl" "$pg/bin/pg_isready" \
        "${modules[@]}" /usr/share/postgresql/$pg_version /usr/share/zoneinfo /bin/dash
    ln -s dash "$root/bin/sh"
    mkdir -p "$root/usr/local/bin"
    install -m 0755 "$here/postgres/entrypoint.sh" "$root/usr/local/bin/postgres-entrypoint"
    mkdir -p "$root/var/run/postgresql" && chown 65532:65532 "$root/var/run/postgresql"
    build postgres "$root" "$label" 'USER 65532:65532' "ENV PATH=$pg/bin:/bin" \
        'ENV PGDATA=/var/lib/postgresql/data' 'VOLUME /var/lib/postgresql' 'EXPOSE 5432' \
        'ENTRYPOINT ["/usr/local/bin/postgres-entrypoint"]'
fi
