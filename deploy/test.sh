#!/usr/bin/env bash
# Sets up a Debian machine for the test suite and runs all of it: the single command for
# a developer's machine and for CI (.ci/run execs it).
#
#   1. Installs redis-server and postgresql with apt-get if they are missing: the
#      integration tests start their own servers from these binaries (fleet-testkit),
#      and fail loudly, never skip, when they are not there.
#   2. Installs cargo-nextest if it is missing.
#   3. Stops and disables the system's own redis-server and postgresql services, which
#      the tests do not use.
#   4. Checks the Docker engine and builds the sandbox image if missing, in the background
#      while the tests compile (deploy/sandbox-image.sh: a Debian rootfs from debootstrap,
#      no registry needed): the sandbox and whole-fleet tests run real containers, and
#      fail loudly without.
#   5. Checks the Kubernetes manifests (deploy/k8s/check.sh), runs the doc tests, then
#      every other test with nextest (profile `ci` in
#      .config/nextest.toml), and fails if either failed.
#      Then fuzzes a live API against its OpenAPI document with schemathesis, with a token
#      of each role (deploy/schemathesis.sh).
#   6. Builds the container images from that build and runs the containerised fleet under
#      faults (deploy/compose/chaos.sh).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

step() { printf '\n==> %s\n' "$*"; }
fail() { printf 'deploy/test.sh: %s\n' "$*" >&2; exit 1; }

if [ "$(id -u)" -eq 0 ]; then
    as_root=()
elif command -v sudo >/dev/null 2>&1; then
    as_root=(sudo)
else
    fail "not root and no sudo: cannot install packages or stop services."
fi

command -v cargo >/dev/null 2>&1 \
    || fail "cargo not found: install a Rust toolchain (rustup) first."

# 1. Server binaries. Debian keeps the PostgreSQL server programs outside PATH.
packages=()
command -v redis-server >/dev/null 2>&1 || packages+=(redis-server)
command -v git >/dev/null 2>&1 || packages+=(git)
command -v docker-compose >/dev/null 2>&1 || docker compose version >/dev/null 2>&1 || packages+=(docker-compose)
command -v openssl >/dev/null 2>&1 || packages+=(openssl)
if ! compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null \
    && ! command -v initdb >/dev/null 2>&1; then
    packages+=(postgresql)
fi
if [ "${#packages[@]}" -gt 0 ]; then
    step "Installing ${packages[*]} with apt-get."
    "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q
    "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -q --no-install-recommends "${packages[@]}"
else
    step "redis-server and postgresql are installed."
fi
redis-server --version

# 2. The test runner.
if ! cargo nextest --version >/dev/null 2>&1; then
    step "Installing cargo-nextest (cargo install --locked cargo-nextest)."
    cargo install --locked cargo-nextest
fi
cargo nextest --version | head -n 1

# 3. The packages start system services on machines with an init system. Tests start
#    servers of their own on free ports, so these only take memory and CPU.
step "Stopping the system's redis-server and postgresql services, if running."
if [ -d /run/systemd/system ]; then
    for unit in redis-server postgresql; do
        if systemctl list-unit-files "$unit.service" >/dev/null 2>&1; then
            echo "systemctl disable --now $unit"
            "${as_root[@]}" systemctl disable --now "$unit" || true
        fi
    done
else
    for service in redis-server postgresql; do
        if [ -x "/etc/init.d/$service" ] && service "$service" status >/dev/null 2>&1; then
            echo "service $service stop"
            "${as_root[@]}" service "$service" stop || true
        fi
    done
fi
echo "Done."

# 4. The sandboxes' engine and image. The image (debootstrap: mostly downloads) builds in
#    the background while cargo compiles; the tests start only once it is there.
step "Docker engine and the sandbox image (building in the background)."
command -v docker >/dev/null 2>&1 || fail "docker not found: the sandbox tests need a Docker engine (apt-get install docker.io)."
docker info >/dev/null 2>&1 || fail "the Docker engine is not reachable (is dockerd running? /var/run/docker.sock)."
image_log=$(mktemp /tmp/agentfleet-sandbox-image.XXXXXX)
./deploy/sandbox-image.sh >"$image_log" 2>&1 &
image_pid=$!

# 5. The tests. Doc tests first, so that the last thing printed is nextest's summary. The
#    dev profile, as the demo's build: after `./deploy/demo.sh` only the test harnesses
#    are left to compile.
status=0
step "Kubernetes manifests (deploy/k8s/check.sh: Kubernetes and KEDA schemas, policy invariants, self-test)"
deploy/k8s/check.sh || status=1
step "cargo test --workspace --doc --locked"
cargo test --workspace --doc --locked || status=1
step "cargo nextest run --workspace --locked --no-run (compiling the tests)"
cargo nextest run --workspace --locked --no-run --cargo-quiet || status=1
step "Waiting for the sandbox image."
wait "$image_pid" || { cat "$image_log" >&2; fail "building the sandbox image failed (deploy/sandbox-image.sh; output above)."; }
tail -n 3 "$image_log"
rm -f "$image_log"
step "cargo nextest run --workspace --locked --no-fail-fast --profile ci"
cargo nextest run --workspace --locked --no-fail-fast --profile ci || status=1
step "The HTTP API against its OpenAPI document (deploy/schemathesis.sh: schemathesis with a token of each role)"
deploy/schemathesis.sh || status=1

# 6. The fleet as its users run it: images (from the test build above, not a release
#    build), the compose deployment, and the chaos run against it (deploy/compose/chaos.sh).
step "Container images (deploy/images.sh --profile dev) and the compose chaos run"
if deploy/images.sh --profile dev >/dev/null && deploy/compose/setup.sh && deploy/compose/chaos.sh; then
    echo "compose chaos run: passed"
else
    echo "compose chaos run: FAILED" >&2
    status=1
fi

if [ "$status" -ne 0 ]; then
    printf '\ndeploy/test.sh: some tests failed (see above).\n' >&2
fi
exit "$status"
