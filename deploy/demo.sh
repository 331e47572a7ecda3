#!/usr/bin/env bash
# The agentfleet demo: the one command that shows the fleet working end to end on a fresh
# machine. It installs what it needs (redis-server, postgresql), builds the binaries, starts
# a private Redis and Postgres on loopback, and runs what exists so far:
#
#   operator keys → orchestrator + outbox-relay → a task submitted over the HTTP API →
#   its signed task.assign relayed onto fleet:tasks:dev and verified by `fleetctl tail` →
#   kill switch and resume → the audit trail verified.
#
# The Dev/QA/Review/Refactor workers and the budget manager are not built yet (their issues
# are open), so no agent picks the task up: the demo says so when it gets there.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
fail() { printf 'deploy/demo.sh: %s\n' "$*" >&2; exit 1; }

as_root=()
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 && as_root=(sudo) || true
fi
command -v cargo >/dev/null 2>&1 || fail "cargo not found: install a Rust toolchain (rustup) first."

packages=()
command -v redis-server >/dev/null 2>&1 || packages+=(redis-server)
command -v curl >/dev/null 2>&1 || packages+=(curl ca-certificates)
compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || command -v initdb >/dev/null 2>&1 || packages+=(postgresql)
if [ "${#packages[@]}" -gt 0 ]; then
    say "Installing ${packages[*]} with apt-get"
    "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q
    "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${packages[@]}"
fi
pg_bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
[ -n "$pg_bin" ] || pg_bin=$(dirname "$(command -v initdb)")

say "Building fleetctl, orchestrator and outbox-relay (release)"
cargo build --release --locked -q -p fleetctl -p orchestrator -p outbox-relay
bin=$PWD/target/release
fleetctl=$bin/fleetctl

work=$(mktemp -d)
chmod 755 "$work"
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    if [ -d "$work/pg" ]; then run_pg "$pg_bin/pg_ctl" -D "$work/pg" -m immediate stop >/dev/null 2>&1 || true; fi
    rm -rf "$work"
}
trap cleanup EXIT
run_pg() { if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }

redis_port=${DEMO_REDIS_PORT:-16379}
pg_port=${DEMO_PG_PORT:-15432}
api_port=${DEMO_API_PORT:-18080}

say "Starting a private redis-server on 127.0.0.1:$redis_port and Postgres on 127.0.0.1:$pg_port"
redis-server --port "$redis_port" --bind 127.0.0.1 --save '' --appendonly no --dir "$work" --daemonize no >"$work/redis.log" 2>&1 &
pids+=($!)
mkdir -p "$work/pg" "$work/pgsock"
[ "$(id -u)" -eq 0 ] && chown postgres: "$work/pg" "$work/pgsock"
run_pg "$pg_bin/initdb" -D "$work/pg" -U postgres --auth=trust --encoding=UTF8 --locale=C >/dev/null
run_pg "$pg_bin/pg_ctl" -D "$work/pg" -l "$work/pg/server.log" -w \
    -o "-p $pg_port -k $work/pgsock -c listen_addresses=127.0.0.1 -c fsync=off" start >/dev/null
for _ in $(seq 50); do redis-cli -p "$redis_port" ping >/dev/null 2>&1 && break; sleep 0.1; done
db_url="postgres://postgres@127.0.0.1:$pg_port/postgres"
redis_url="redis://127.0.0.1:$redis_port"

say "Operator: master secret, per-process keysets, audit key, API token secret"
"$fleetctl" keys master new --out "$work/master.toml" >/dev/null
for p in orchestrator operator dev; do
    "$fleetctl" keys derive --master "$work/master.toml" --process "$p" --out "$work/$p.keyset.toml" >/dev/null
done
"$fleetctl" keys list --keyset "$work/dev.keyset.toml"
"$fleetctl" audit key new --out "$work/audit.key" >/dev/null
"$fleetctl" token secret new --out "$work/jwt.secret" >/dev/null
"$fleetctl" db migrate --database-url "$db_url"

cat >"$work/orchestrator.toml" <<TOML
instance = "orchestrator-0"
keyset = "$work/orchestrator.keyset.toml"
permissions = "$PWD/config/permissions.toml"
audit_key_file = "$work/audit.key"
jwt_secret_file = "$work/jwt.secret"
listen = "127.0.0.1:$api_port"
TOML
printf 'poll_interval_ms = 500\n' >"$work/relay.toml"

say "Starting the orchestrator (HTTP API on 127.0.0.1:$api_port) and the outbox relay"
FLEET_DATABASE_URL=$db_url FLEET_REDIS_URL=$redis_url "$bin/orchestrator" --config "$work/orchestrator.toml" >"$work/orchestrator.log" 2>&1 &
pids+=($!)
FLEET_DATABASE_URL=$db_url FLEET_REDIS_URL=$redis_url "$bin/outbox-relay" --config "$work/relay.toml" >"$work/relay.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do curl -fs "http://127.0.0.1:$api_port/readyz" >/dev/null 2>&1 && break; sleep 0.1; done
curl -fs "http://127.0.0.1:$api_port/readyz" >/dev/null || { cat "$work/orchestrator.log"; fail "the orchestrator did not become ready"; }

export FLEET_API_URL="http://127.0.0.1:$api_port"
FLEET_TOKEN=$("$fleetctl" token issue --role admin --sub demo-admin --ttl 1h --secret-file "$work/jwt.secret")
export FLEET_TOKEN

say "Submitting a task over the HTTP API"
cat >"$work/task.json" <<'JSON'
{"title": "Validate login input", "instructions": "Add input validation to login() and a test for it.", "repository": "https://git.example/app.git", "test_command": "pytest -q", "risk": "LOW"}
JSON
"$fleetctl" submit "$work/task.json"

say "The assignment, signed by the orchestrator inside its transaction, relayed to fleet:tasks:dev and verified here"
"$fleetctl" tail fleet:tasks:dev --from-start --count 1 --keyset "$work/operator.keyset.toml" --redis "$redis_url"
"$fleetctl" tasks

say "No Dev worker exists yet (issue 5), so nobody answers: the task waits in 'dev' until its deadline."
say "Kill switch: every open task halts; resume re-issues each step under the new kill epoch"
"$fleetctl" kill --reason "demo: operator pulls the kill switch"
"$fleetctl" tasks
"$fleetctl" resume
"$fleetctl" tail fleet:tasks:dev --from-start --count 2 --keyset "$work/operator.keyset.toml" --redis "$redis_url"

say "Audit trail: every transition hash-chained and MACed"
"$fleetctl" audit verify --database-url "$db_url" --audit-key-file "$work/audit.key"

say "Done. Built so far: envelopes, keys, bus, orchestrator, outbox relay, operator CLI. Not yet: workers and sandboxes (issue 5), budget manager (issue 6)."
