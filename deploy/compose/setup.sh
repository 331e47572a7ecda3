#!/usr/bin/env bash
# Makes everything deploy/compose.yaml needs that must not be in git: the fleet's keys and
# secrets, one Redis user per process (fleetctl acl generate), a CA with certificates for
# Redis and Postgres, Postgres's passwords and first-start SQL, each process's URL secret
# files, the configuration files, and the host directories the sandbox runner shares with
# the engine. Everything goes under deploy/compose/state/ (mode 0700, ignored by git), and
# deploy/.env tells compose where.
#
# Usage: deploy/compose/setup.sh [--force]
#   --force  make new secrets even if state/ exists (a fresh fleet: the old data volumes
#            will not accept the new passwords; `docker compose down -v` first).
# Needs: docker with the images of deploy/images.sh (fleetctl runs from its image), openssl.
# Must run as root: the secret files are handed to the uid of the container that reads them.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
deploy="$(dirname "$here")"
repo_root="$(dirname "$deploy")"
state="$here/state"
force=0
for arg in "$@"; do
    case "$arg" in
        --force) force=1 ;;
        -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
        *) echo "compose/setup: unknown argument '$arg' (only --force)" >&2; exit 64 ;;
    esac
done
log() { echo "compose/setup: $*" >&2; }
[ "$(id -u)" = 0 ] || { log "run as root: secret files are handed to the uids of the containers"; exit 77; }
command -v openssl >/dev/null || { log "openssl not found (apt-get install openssl)"; exit 69; }
docker image inspect agentfleet/fleetctl:current >/dev/null 2>&1 \
    || { log "the image agentfleet/fleetctl:current is missing: run deploy/images.sh first"; exit 69; }

if [ -e "$state/done" ] && [ "$force" = 0 ]; then
    log "state exists ($state); keeping it (--force makes new secrets)"
    exit 0
fi
rm -rf "$state"
install -d -m 0700 "$state" "$state/secrets" "$state/config"
s=$state/secrets
# The fleet's user ids: 65532 every fleet process, 65533 the sandbox runner.
fleet=65532
runner=65533

fleetctl() {
    docker run --rm --network none --read-only --user "$fleet:$fleet" -v "$s:/out" \
        -v "$repo_root/config:/etc/agentfleet/config:ro" agentfleet/fleetctl:current "$@"
}
chown "$fleet:$fleet" "$s"

log "keys: master secret, one keyset per process, audit key, API and lease secrets"
fleetctl keys master new --out /out/master.toml >/dev/null
for p in orchestrator operator budget dev qa review refactor; do
    fleetctl keys derive --master /out/master.toml --process "$p" --out "/out/$p.keyset.toml" >/dev/null
done
fleetctl audit key new --out /out/audit.key >/dev/null
fleetctl token secret new --out /out/jwt.secret >/dev/null
fleetctl token secret new --for lease --out /out/lease.secret >/dev/null

log "Redis users (fleetctl acl generate from config/permissions.toml)"
fleetctl acl secrets new --out /out/redis-secrets.toml >/dev/null
fleetctl acl generate --secrets /out/redis-secrets.toml --permissions /etc/agentfleet/config/permissions.toml \
    --out /out/users.acl >/dev/null
password_of() { sed -n "s/^$1 *= *\"\([0-9a-f]*\)\"/\1/p" "$s/redis-secrets.toml"; }
for user in orchestrator outbox-relay budget dev qa review refactor operator; do
    pw=$(password_of "$user")
    [ -n "$pw" ] || { log "no Redis password for $user in redis-secrets.toml"; exit 1; }
    printf 'rediss://%s:%s@redis:6379' "$user" "$pw" >"$s/redis-url-$user"
done

log "a CA and certificates for redis and postgres"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 3650 -subj "/CN=agentfleet compose CA" \
    -keyout "$state/ca.key" -out "$s/ca.crt" 2>/dev/null
for server in redis postgres; do
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=$server" \
        -keyout "$s/$server.key" -out "$state/$server.csr" 2>/dev/null
    printf 'subjectAltName=DNS:%s,DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n' "$server" >"$state/$server.ext"
    openssl x509 -req -in "$state/$server.csr" -CA "$s/ca.crt" -CAkey "$state/ca.key" -CAcreateserial -days 825 \
        -extfile "$state/$server.ext" -out "$s/$server.crt" 2>/dev/null
done

log "Postgres: superuser password, the fleet's roles, TLS-only scram access"
openssl rand -hex 32 >"$s/postgres-password"
orch_pw=$(openssl rand -hex 32)
relay_pw=$(openssl rand -hex 32)
cat >"$s/postgres-init.sql" <<SQL
CREATE ROLE orchestrator LOGIN PASSWORD '$orch_pw';

CREATE ROLE fleet_relay LOGIN PASSWORD '$relay_pw';

CREATE DATABASE agentfleet OWNER orchestrator;

REVOKE ALL ON DATABASE agentfleet FROM PUBLIC;

GRANT CONNECT ON DATABASE agentfleet TO fleet_relay;
SQL
cat >"$s/pg_hba.conf" <<'HBA'
# Local socket: the image's own tools. Network: TLS and scram only.
local     all  all                 scram-sha-256
hostssl   all  all  0.0.0.0/0      scram-sha-256
hostssl   all  all  ::/0           scram-sha-256
hostnossl all  all  0.0.0.0/0      reject
hostnossl all  all  ::/0           reject
HBA
tls='sslmode=verify-full&sslrootcert=/run/secrets/ca.crt'
printf 'postgres://orchestrator:%s@postgres:5432/agentfleet?%s' "$orch_pw" "$tls" >"$s/database-url-orchestrator"
printf 'postgres://fleet_relay:%s@postgres:5432/agentfleet?%s' "$relay_pw" "$tls" >"$s/database-url-outbox-relay"

log "configuration files"
c=$state/config
cat >"$c/ledger.toml" <<'TOML'
daily_tokens = 5000000
daily_micro_usd = 100000000
per_task_tokens = 100000
per_task_micro_usd = 2000000
reservation_ttl_secs = 600
[prices.scripted-1]
input_micro_usd_per_mtok = 3000000
output_micro_usd_per_mtok = 15000000
TOML
cat >"$c/orchestrator.toml" <<'TOML'
# The orchestrator in deploy/compose.yaml; URLs come from FLEET_*_URL_FILE secrets.
instance = "orchestrator-0"
keyset = "/run/secrets/orchestrator.keyset.toml"
audit_key_file = "/run/secrets/audit.key"
jwt_secret_file = "/run/secrets/jwt.secret"
redis_ca_file = "/run/secrets/ca.crt"
listen = "0.0.0.0:8080"
workspace_root = "/var/lib/agentfleet/workspace"

# Tasks' repositories: bare repositories under /srv/repos (FLEET_REPOS on the host).
[repositories]
local_roots = ["/srv/repos"]

[tools]
lease_secret_file = "/run/secrets/lease.secret"
ledger = "/etc/agentfleet/ledger.toml"
# The offline scripted model (config/fixtures/demo.toml); set a real provider here
# (docs/tool-proxy.md) with its key from FLEET_TOOLS__PROVIDER__API_KEY_FILE.
[tools.provider]
kind = "scripted"
fixture = "/etc/agentfleet/fixtures/demo.toml"
[tools.models]
default = "scripted-1"
TOML
{
    printf 'instance = "budget-0"\nkeyset = "/run/secrets/budget.keyset.toml"\nredis_ca_file = "/run/secrets/ca.crt"\n\n[ledger]\n'
    sed 's/^\[prices\./[ledger.prices./' "$c/ledger.toml"
} >"$c/budget.toml"

# Who reads what: each file belongs to the uid of its one reader.
chown -R "$fleet:$fleet" "$s"
chmod 0400 "$s"/*
chmod 0444 "$s/ca.crt"
chmod 0644 "$c"/*
chmod 0711 "$state"
rm -f "$state"/*.csr "$state"/*.ext "$state"/*.srl "$s/ca.srl"

workspace=${FLEET_WORKSPACE:-/var/lib/agentfleet/workspace}
repos=${FLEET_REPOS:-/var/lib/agentfleet/repos}
log "host directories: $workspace (the runner's, shared with the engine), $repos"
install -d -m 0755 -o "$runner" -g "$runner" "$workspace"
install -d -m 0755 -o "$fleet" -g "$fleet" "$repos"

docker_gid=$(stat -c %g /var/run/docker.sock)
cat >"$deploy/.env" <<ENV
# Written by deploy/compose/setup.sh.
COMPOSE_PROJECT_NAME=agentfleet
FLEET_STATE=$state
FLEET_WORKSPACE=$workspace
FLEET_REPOS=$repos
DOCKER_GID=$docker_gid
ENV
touch "$state/done"
log "done: docker-compose -f deploy/compose.yaml up -d"
