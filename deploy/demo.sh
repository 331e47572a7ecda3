#!/usr/bin/env bash
# The agentfleet demo: the one command that shows the fleet doing its job end to end on a
# fresh machine.
#
#   A bundled example repository with a failing test (deploy/example-repo) is put in a local
#   bare repository. A task is submitted over the HTTP API. Dev asks the model (the offline
#   `scripted` provider, through the orchestrator's tool proxy and its capability lease) for
#   a fix and checks it builds in a throwaway Docker sandbox; QA runs the tests and the
#   static checks in a sandbox; Review gatekeeps the diff (scope, secrets, dependencies) and
#   sends it to Refactor for a style finding; Refactor runs the repository's formatter in a
#   sandbox; QA and Review pass it again; the orchestrator pushes `agentfleet/task-<id>` to
#   the bare repository. Every envelope is shown live as it crosses Redis. The audit trail is
#   verified at the end, and the kill switch is pulled and released once.
#
#   The repository has one third-party dependency (deploy/demo-dependency: `demogreet`,
#   pinned with its hash in requirements.txt). Before the first test run, the worker asks
#   the tool proxy for `pkg_install` and installs it in a sandbox whose only way out is the
#   egress proxy (squid, image deploy/egress-proxy-image.sh, policy from `sandbox-runner
#   egress-policy`), from the demo's own package index (an in-house mirror on a private
#   network); every later run has no network at all.
#
# It installs what it needs (redis-server, postgresql, git, debootstrap for the sandbox
# image), builds the binaries and the sandbox image if missing, starts a private Redis and
# Postgres on loopback unless FLEET_REDIS_URL / FLEET_DATABASE_URL are set, and stops every
# process it started when it ends (also on Ctrl-C or failure).
set -euo pipefail
cd "$(dirname "$0")/.."
repo_root=$PWD

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
fail() { printf 'deploy/demo.sh: %s\n' "$*" >&2; exit 1; }

as_root=()
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 && as_root=(sudo) || true
fi
command -v cargo >/dev/null 2>&1 || fail "cargo not found: install a Rust toolchain (rustup) first."
command -v docker >/dev/null 2>&1 || fail "docker not found: the sandboxes need a Docker engine (apt-get install docker.io)."
docker info >/dev/null 2>&1 || fail "the Docker engine is not reachable: start it (systemctl start docker) and check /var/run/docker.sock."

packages=()
if [ -z "${FLEET_REDIS_URL:-}" ]; then command -v redis-server >/dev/null 2>&1 || packages+=(redis-server); fi
command -v curl >/dev/null 2>&1 || packages+=(curl ca-certificates)
command -v git >/dev/null 2>&1 || packages+=(git)
if [ -z "${FLEET_DATABASE_URL:-}" ]; then
    compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || command -v initdb >/dev/null 2>&1 || packages+=(postgresql)
fi
if [ "${#packages[@]}" -gt 0 ]; then
    say "Installing ${packages[*]} with apt-get"
    "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q
    "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${packages[@]}"
fi

# The sandbox image (debootstrap: mostly downloads) builds while cargo compiles.
say "Sandbox image (built locally from Debian packages if missing; no registry needed), in the background"
image_log=$(mktemp /tmp/agentfleet-sandbox-image.XXXXXX)
"$repo_root/deploy/sandbox-image.sh" >"$image_log" 2>&1 &
image_pid=$!

# The dev profile, the one the test command builds too: `./deploy/test.sh` after the demo
# reuses this build, and a first run is a few minutes instead of the quarter hour a
# release build with LTO takes on two cores. Images and benchmarks keep the tuned
# release profile.
say "Building the fleet: fleetctl, orchestrator, outbox-relay, budget, dev/qa/review/refactor-worker"
cargo build --locked -q -p fleetctl -p orchestrator -p outbox-relay -p budget -p workers
bin=$repo_root/target/debug
fleetctl=$bin/fleetctl

if ! wait "$image_pid"; then
    cat "$image_log" >&2
    rm -f "$image_log"
    fail "building the sandbox image failed (deploy/sandbox-image.sh; its output is above)"
fi
image=$(tail -n 1 "$image_log")
rm -f "$image_log"
echo "sandbox image: $image"
say "Egress proxy image (squid from Debian's packages, on the sandbox image)"
proxy_image=$("$repo_root/deploy/egress-proxy-image.sh" 2>/dev/null | tail -n 1) \
    || fail "building the egress proxy image failed (run deploy/egress-proxy-image.sh to see why)"
echo "egress proxy image: $proxy_image"

work=$(mktemp -d /tmp/agentfleet-demo.XXXXXX)
chmod 755 "$work"
pids=()
containers=()
networks=()
cleanup() {
    local code=$?
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
    if [ -d "$work/pg" ]; then run_pg "$pg_bin/pg_ctl" -D "$work/pg" -m immediate stop >/dev/null 2>&1 || true; fi
    for c in "${containers[@]}"; do timeout 30 docker rm -f "$c" >/dev/null 2>&1 || true; done
    for n in "${networks[@]}"; do timeout 30 docker network rm "$n" >/dev/null 2>&1 || true; done
    # Sandboxes of this demo's workers, if one was killed mid-run (by label; bounded, so an
    # engine in trouble cannot hang the cleanup).
    for role in dev qa review refactor; do
        for c in $(timeout 10 docker ps -aq --filter label=agentfleet.sandbox=1 \
            --filter "label=agentfleet.instance=demo-$role-1" 2>/dev/null); do
            timeout 30 docker rm -f "$c" >/dev/null 2>&1 || true
        done
    done
    if [ "$code" -ne 0 ]; then
        printf '\ndeploy/demo.sh failed; the processes'"'"' logs follow.\n' >&2
        for f in "$work"/*.log; do [ -f "$f" ] && { printf '\n--- %s (last 40 lines)\n' "$f"; tail -n 40 "$f"; } >&2; done
    fi
    rm -rf "$work"
    exit "$code"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
run_pg() { if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
pg_bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)

redis_url=${FLEET_REDIS_URL:-}
db_url=${FLEET_DATABASE_URL:-}
# Each process gets exactly the settings it has: a worker refuses FLEET_DATABASE_URL (an
# unknown setting), so nothing FLEET_… is inherited.
unset FLEET_REDIS_URL FLEET_DATABASE_URL
api_port=${DEMO_API_PORT:-18080}
acl=0
if [ -z "$redis_url" ]; then
    redis_port=${DEMO_REDIS_PORT:-16379}
    say "Starting a throwaway redis-server on 127.0.0.1:$redis_port with the fleet's ACLs (one user per process)"
    # The permission table as Redis ACLs: each process connects as its own user, and Redis
    # itself refuses what config/permissions.toml does not grant (docs/operations.md).
    "$fleetctl" acl secrets new --out "$work/redis-secrets.toml" >/dev/null
    "$fleetctl" acl generate --secrets "$work/redis-secrets.toml" --permissions "$repo_root/config/permissions.toml" \
        --out "$work/users.acl" >/dev/null
    # Append-only, fsynced every second, as deployments run it: a restart keeps the streams.
    redis-server --port "$redis_port" --bind 127.0.0.1 --save '' --appendonly yes --appendfsync everysec --dir "$work" \
        --aclfile "$work/users.acl" --daemonize no >"$work/redis.log" 2>&1 &
    pids+=($!)
    acl=1
    redis_url="redis://127.0.0.1:$redis_port"
fi
# The Redis URL of one fleet user: with the demo's own server, that user's password.
url_for() {
    if [ "$acl" = 1 ]; then
        local pw
        pw=$(sed -n "s/^$1 *= *\"\([0-9a-f]*\)\"/\1/p" "$work/redis-secrets.toml")
        printf 'redis://%s:%s@127.0.0.1:%s' "$1" "$pw" "$redis_port"
    else
        printf '%s' "$redis_url"
    fi
}
if [ "$acl" = 1 ]; then
    for _ in $(seq 50); do
        [ "$(redis-cli --no-auth-warning -u "$(url_for operator)" ping 2>/dev/null)" = PONG ] && break
        sleep 0.1
    done
    refusal=$(redis-cli --no-auth-warning -u "$(url_for dev)" XADD fleet:tasks:qa '*' env forged 2>&1 || true)
    printf 'as dev, XADD fleet:tasks:qa (a worker forging an assignment): %s\n' "$refusal"
fi
if [ -z "$db_url" ]; then
    pg_port=${DEMO_PG_PORT:-15432}
    [ -n "$pg_bin" ] || pg_bin=$(dirname "$(command -v initdb)")
    say "Starting a throwaway Postgres on 127.0.0.1:$pg_port"
    mkdir -p "$work/pg" "$work/pgsock"
    [ "$(id -u)" -eq 0 ] && chown postgres: "$work/pg" "$work/pgsock"
    run_pg "$pg_bin/initdb" -D "$work/pg" -U postgres --auth=trust --encoding=UTF8 --locale=C >/dev/null
    run_pg "$pg_bin/pg_ctl" -D "$work/pg" -l "$work/pg/server.log" -w \
        -o "-p $pg_port -k $work/pgsock -c listen_addresses=127.0.0.1 -c fsync=off" start >/dev/null
    db_url="postgres://postgres@127.0.0.1:$pg_port/postgres"
fi

say "Operator: master secret, one keyset per process, audit key, API token and lease secrets"
"$fleetctl" keys master new --out "$work/master.toml" >/dev/null
for p in orchestrator operator budget dev qa review refactor; do
    "$fleetctl" keys derive --master "$work/master.toml" --process "$p" --out "$work/$p.keyset.toml" >/dev/null
done
"$fleetctl" audit key new --out "$work/audit.key" >/dev/null
"$fleetctl" token secret new --out "$work/jwt.secret" >/dev/null
"$fleetctl" token secret new --for lease --out "$work/lease.secret" >/dev/null
"$fleetctl" db migrate --database-url "$db_url"

say "The package index (an in-house mirror) and the egress proxy, on networks of their own"
tag=$(basename "$work" | tr 'A-Z' 'a-z' | tr -cd 'a-z0-9')
egress_net="agentfleet-demo-egress-$tag" pkgs_net="agentfleet-demo-pkgs-$tag"
docker network create --internal "$egress_net" >/dev/null && networks+=("$egress_net")
docker network create "$pkgs_net" >/dev/null && networks+=("$pkgs_net")
pkgs_subnet=$(docker network inspect -f '{{(index .IPAM.Config 0).Subnet}}' "$pkgs_net")
mkdir -p "$work/pkgindex"
dep_hash=$(python3 "$repo_root/deploy/demo-dependency/make-index.py" "$repo_root/deploy/demo-dependency" "$work/pkgindex" \
    | sed -n 's/^demogreet //p')
[ -n "$dep_hash" ] || fail "building the demo's package index failed (deploy/demo-dependency/make-index.py)"
chmod -R a+rX "$work/pkgindex"
containers+=("agentfleet-demo-index-$tag")
docker run -d --name "agentfleet-demo-index-$tag" --network "$pkgs_net" --network-alias pkgindex \
    -v "$work/pkgindex:/srv:ro" -w /srv "$image" python3 -m http.server 8000 >/dev/null
# The proxy's whole policy: the index by name; its private network as an in-house mirror;
# everything else refused, the metadata address and private ranges after resolution too.
"$bin/sandbox-runner" egress-policy --registry pkgindex --private-mirror "$pkgs_subnet" --port 8000 >"$work/squid.conf"
chmod 644 "$work/squid.conf"
containers+=("agentfleet-demo-proxy-$tag")
docker run -d --name "agentfleet-demo-proxy-$tag" --network "$pkgs_net" \
    -v "$work/squid.conf:/etc/squid/agentfleet.conf:ro" "$proxy_image" >/dev/null
docker network connect --alias egress-proxy "$egress_net" "agentfleet-demo-proxy-$tag"
for _ in $(seq 100); do
    docker logs "agentfleet-demo-proxy-$tag" 2>&1 | grep -q "Accepting HTTP Socket connections" && break
    sleep 0.2
done
echo "index: http://pkgindex:8000/simple (demogreet 1.0, sha256 $dep_hash); proxy: http://egress-proxy:3128 on $egress_net"

say "The example repository (a Python project whose test fails, with one locked dependency) as a local bare repository"
cp -r "$repo_root/deploy/example-repo" "$work/example"
printf 'demogreet==1.0 \\\n    --hash=sha256:%s\n' "$dep_hash" >"$work/example/requirements.txt"
cp "$repo_root/deploy/demo-dependency/test_dependency.py" "$work/example/tests/"
cat "$work/example/requirements.txt"
git -C "$work/example" init -q -b main
git -C "$work/example" add -A
git -C "$work/example" -c user.name=demo -c user.email=demo@localhost commit -qm "example project with a failing test"
git clone -q --bare "$work/example" "$work/example.git"
git -C "$work/example.git" log --oneline
mkdir -p "$work/workspaces"

cat >"$work/ledger.toml" <<'TOML'
daily_tokens = 500000
daily_micro_usd = 10000000
per_task_tokens = 100000
per_task_micro_usd = 2000000
reservation_ttl_secs = 600
[prices.scripted-1]
input_micro_usd_per_mtok = 3000000
output_micro_usd_per_mtok = 15000000
TOML
# The shipped matrix, with the work hours round the clock: pkg_install is MEDIUM, which runs
# unattended only within them (08:00-22:00 UTC as shipped), and the demo runs at any hour.
sed 's/^start = "08:00"$/start = "00:00"/; s/^end = "22:00"$/end = "24:00"/' \
    "$repo_root/config/risk_matrix.toml" >"$work/risk_matrix.toml"
grep -q '^end = "24:00"$' "$work/risk_matrix.toml" || fail "config/risk_matrix.toml's [work_hours] moved; update deploy/demo.sh"
cat >"$work/orchestrator.toml" <<TOML
instance = "orchestrator-0"
keyset = "$work/orchestrator.keyset.toml"
permissions = "$repo_root/config/permissions.toml"
audit_key_file = "$work/audit.key"
jwt_secret_file = "$work/jwt.secret"
listen = "127.0.0.1:$api_port"
workspace_root = "$work/workspaces"

# Tasks may name repositories under the demo's directory only (its bare repository).
[repositories]
local_roots = ["$work"]

[tools]
lease_secret_file = "$work/lease.secret"
risk_matrix = "$work/risk_matrix.toml"
ledger = "$work/ledger.toml"
[tools.provider]
kind = "scripted"
fixture = "$repo_root/config/fixtures/demo.toml"
[tools.models]
default = "scripted-1"
TOML
printf 'poll_interval_ms = 200\n' >"$work/relay.toml"
{
    printf 'instance = "budget-0"\nkeyset = "%s"\npermissions = "%s"\n\n[ledger]\n' \
        "$work/budget.keyset.toml" "$repo_root/config/permissions.toml"
    cat "$work/ledger.toml" | sed 's/^\[prices\./[ledger.prices./'
} >"$work/budget.toml"
for role in dev qa review refactor; do
    cat >"$work/$role.toml" <<TOML
keyset = "$work/$role.keyset.toml"
permissions = "$repo_root/config/permissions.toml"
instance = "demo-$role-1"
workspace_root = "$work/workspaces"
heartbeat_secs = 2
[sandbox]
image = "$image"
timeout_secs = 120
[sandbox.egress]
network = "$egress_net"
proxy_url = "http://egress-proxy:3128"
python_index_url = "http://pkgindex:8000/simple"
TOML
done

say "Starting orchestrator (API on 127.0.0.1:$api_port), outbox-relay, budget and one worker per role"
FLEET_REDIS_URL=$(url_for orchestrator) FLEET_DATABASE_URL=$db_url "$bin/orchestrator" --config "$work/orchestrator.toml" >"$work/orchestrator.log" 2>&1 &
pids+=($!)
FLEET_REDIS_URL=$(url_for outbox-relay) FLEET_DATABASE_URL=$db_url "$bin/outbox-relay" --config "$work/relay.toml" >"$work/relay.log" 2>&1 &
pids+=($!)
FLEET_REDIS_URL=$(url_for budget) "$bin/budget" --config "$work/budget.toml" >"$work/budget.log" 2>&1 &
pids+=($!)
for role in dev qa review refactor; do
    FLEET_REDIS_URL=$(url_for "$role") "$bin/$role-worker" --config "$work/$role.toml" >"$work/$role.log" 2>&1 &
    pids+=($!)
done
for _ in $(seq 150); do curl -fs "http://127.0.0.1:$api_port/readyz" >/dev/null 2>&1 && break; sleep 0.1; done
curl -fs "http://127.0.0.1:$api_port/readyz" >/dev/null || fail "the orchestrator did not become ready"

export FLEET_API_URL="http://127.0.0.1:$api_port"
FLEET_TOKEN=$("$fleetctl" token issue --role admin --sub demo-admin --ttl 1h --secret-file "$work/jwt.secret")
export FLEET_TOKEN

say "Envelopes crossing Redis, live (verified with the operator's keyset as they arrive)"
for s in fleet:tasks:dev fleet:tasks:qa fleet:tasks:review fleet:tasks:refactor fleet:tool:requests fleet:results fleet:usage; do
    "$fleetctl" tail "$s" --keyset "$work/operator.keyset.toml" --redis "$(url_for operator)" 2>>"$work/tail.log" &
    pids+=($!)
done
sleep 1

say "Submitting the task over the HTTP API"
cat >"$work/task.json" <<JSON
{"title": "Fix add() so the test suite passes",
 "instructions": "The test suite of this project fails: fix the failing test by correcting calc.py.",
 "repository": "$work/example.git",
 "test_command": "sh .agentfleet/test",
 "scope": ["calc.py", "tests/"],
 "risk": "LOW"}
JSON
task_id=$("$fleetctl" submit "$work/task.json" --json | sed -n 's/.*"id": *"\([0-9a-f-]*\)".*/\1/p' | head -n 1)
[ -n "$task_id" ] || fail "the submission did not return a task id"
echo "task $task_id submitted"

deadline=$((SECONDS + ${DEMO_TIMEOUT_SECS:-600}))
state=""
while [ $SECONDS -lt $deadline ]; do
    state=$("$fleetctl" task "$task_id" --json | sed -n 's/.*"state": *"\([a-z_]*\)".*/\1/p' | head -n 1)
    case "$state" in merged|failed|blocked) break ;; esac
    sleep 1
done
sleep 1
say "The task ended in state '$state'"
"$fleetctl" task "$task_id"
[ "$state" = merged ] || fail "the task did not reach 'merged' (state: ${state:-unknown})"

say "The branch the orchestrator pushed to the bare repository"
git -C "$work/example.git" log --oneline "agentfleet/task-$task_id"
git -C "$work/example.git" diff "main..agentfleet/task-$task_id"

say "The locked dependency: permitted by the tool proxy, installed through the egress proxy"
"$fleetctl" trace "$task_id" --database-url "$db_url" | grep 'tool.pkg_install' || true
echo "the egress proxy's log (every request it saw):"
docker logs "agentfleet-demo-proxy-$tag" 2>/dev/null | grep -E 'TCP_|NONE' | head -n 10 || true

say "Fleet status: kill switch, budget, streams, live workers"
"$fleetctl" status --redis "$(url_for operator)" --keyset "$work/operator.keyset.toml" --budget-config "$work/budget.toml" || true

say "Kill switch: pulled by the operator, then released"
"$fleetctl" kill --reason "demo: operator pulls the kill switch"
sleep 2
"$fleetctl" status --redis "$(url_for operator)" --keyset "$work/operator.keyset.toml" --budget-config "$work/budget.toml" 2>/dev/null | head -n 5 || true
"$fleetctl" resume

say "Audit trail: every transition and tool call hash-chained and MACed"
"$fleetctl" audit verify --database-url "$db_url" --audit-key-file "$work/audit.key"

say "Done: the fix is on agentfleet/task-$task_id, every process is being stopped."
