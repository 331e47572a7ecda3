#!/usr/bin/env bash
# The fleet in containers (deploy/compose.yaml) under faults, with the real engine:
#
#   30 tasks are submitted to one dev worker; dev workers are scaled 1 -> 4; a dev worker
#   container is `docker kill`ed while tasks are in flight; Redis's container is cut off
#   its network for 10 s and reconnected; Redis's container is killed and started again
#   (its append-only file keeps the streams); Redis loses all its data (FLUSHALL) and the
#   orchestrator re-issues the open steps; Postgres's container is restarted; dev workers
#   are scaled 4 -> 1.
#
# Then it checks: every task ended `merged`, each pushed exactly one branch, `fleetctl
# audit verify` passes, fleet:dlq is empty, and no sandbox container is left. It runs as
# its own compose project (agentfleet-chaos: its own volumes, host directories and API
# port) with the secrets of deploy/compose/setup.sh, and removes everything it made.
#
# Usage: deploy/compose/chaos.sh        (after deploy/images.sh; runs setup.sh if needed)
# Env: CHAOS_TASKS [30], CHAOS_TIMEOUT_SECS [900], CHAOS_KEEP=1 keeps the fleet up after.
# Exit: 0 all checks passed, 1 a check failed (the fleet's logs are printed).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
deploy="$(dirname "$here")"
repo_root="$(dirname "$deploy")"
cd "$repo_root"
tasks=${CHAOS_TASKS:-30}
timeout_secs=${CHAOS_TIMEOUT_SECS:-900}
say() { printf '\n\033[1m== chaos: %s\033[0m\n' "$*"; }
fail() { printf 'chaos: FAILED: %s\n' "$*" >&2; exit 1; }

"$here/setup.sh" >&2
export COMPOSE_PROJECT_NAME=agentfleet-chaos
export FLEET_API_PORT=${CHAOS_API_PORT:-18480}
base=/var/lib/agentfleet-chaos
export FLEET_WORKSPACE=$base/workspace FLEET_REPOS=$base/repos
if command -v docker-compose >/dev/null 2>&1; then
    compose=(docker-compose -f "$deploy/compose.yaml")
else
    compose=(docker compose -f "$deploy/compose.yaml")
fi
p=$COMPOSE_PROJECT_NAME
fleetctl=${FLEETCTL:-$repo_root/target/debug/fleetctl}
[ -x "$fleetctl" ] || (cargo build --locked -q -p fleetctl)
state=$here/state

cleanup() {
    local code=$?
    if [ "$code" -ne 0 ]; then
        printf '\nchaos: the fleet'"'"'s logs (last 30 lines each):\n' >&2
        for c in $(docker ps -a --filter "label=com.docker.compose.project=$p" --format '{{.Names}}'); do
            printf -- '--- %s\n' "$c" >&2
            docker logs --tail 30 "$c" >&2 2>&1 || true
        done
    fi
    if [ "${CHAOS_KEEP:-0}" != 1 ]; then
        "${compose[@]}" down -v --remove-orphans >/dev/null 2>&1 || true
        for c in $(docker ps -aq --filter label=agentfleet.runner=chaos-runner); do docker rm -f "$c" >/dev/null 2>&1 || true; done
        rm -rf --one-file-system "$base"
    fi
    exit "$code"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

say "a fresh fleet: project $p, API on 127.0.0.1:$FLEET_API_PORT"
"${compose[@]}" down -v --remove-orphans >/dev/null 2>&1 || true
rm -rf --one-file-system "$base"
install -d -m 0755 -o 65533 -g 65533 "$FLEET_WORKSPACE"
install -d -m 0755 -o 65532 -g 65532 "$FLEET_REPOS"
work=$(mktemp -d)
cp -r "$deploy/example-repo" "$work/example"
git -C "$work/example" init -q -b main
git -C "$work/example" add -A
git -C "$work/example" -c user.name=chaos -c user.email=chaos@localhost commit -qm "example project with a failing test"
git clone -q --bare "$work/example" "$FLEET_REPOS/example.git"
chown -R 65532:65532 "$FLEET_REPOS/example.git"
rm -rf "$work"
# The runner sweeps only its own containers: not the demo's or another fleet's.
export FLEET_RUNNER_NAME=chaos-runner
"${compose[@]}" up -d --scale dev-worker=1 2>&1 | tail -n 3
for _ in $(seq 120); do
    curl -fs "http://127.0.0.1:$FLEET_API_PORT/readyz" >/dev/null 2>&1 && break
    sleep 1
done
curl -fs "http://127.0.0.1:$FLEET_API_PORT/readyz" >/dev/null || fail "the orchestrator did not become ready"

export FLEET_API_URL="http://127.0.0.1:$FLEET_API_PORT"
FLEET_TOKEN=$("$fleetctl" token issue --role admin --sub chaos --ttl 2h --secret-file "$state/secrets/jwt.secret")
export FLEET_TOKEN
task_json=$(mktemp)
cat >"$task_json" <<'JSON'
{"title": "Fix add() so the test suite passes",
 "instructions": "The test suite of this project fails: fix the failing test by correcting calc.py.",
 "repository": "/srv/repos/example.git",
 "test_command": "sh .agentfleet/test",
 "scope": ["calc.py", "tests/"],
 "risk": "LOW"}
JSON

say "submitting $tasks tasks"
ids=()
for _ in $(seq "$tasks"); do
    # The API's per-client rate limit: a burst of ten, then one a second (429 until then).
    id=""
    for _ in 1 2 3 4 5; do
        id=$({ "$fleetctl" submit "$task_json" --json 2>/dev/null || true; } | sed -n 's/.*"id": *"\([0-9a-f-]*\)".*/\1/p' | head -n 1)
        [ -n "$id" ] && break
        sleep 1
    done
    [ -n "$id" ] || fail "a submission returned no task id"
    ids+=("$id")
done
rm -f "$task_json"

states() { { "$fleetctl" tasks --limit 1000 --json 2>/dev/null || true; } | grep -o '"state": *"[a-z_]*"' | sed 's/.*"\([a-z_]*\)"$/\1/' | sort | uniq -c | tr '\n' ' '; }
merged() { { "$fleetctl" tasks --limit 1000 --json 2>/dev/null || true; } | { grep -o '"state": *"merged"' || true; } | wc -l; }
# Waits (at most 300 s) until n tasks merged; a halted fleet fails the run at once.
wait_merged_at_least() {
    local n=$1 until=$((SECONDS + 300)) now
    while [ $SECONDS -lt $until ]; do
        now=$(states)
        case "$now" in *halted*) fail "the kill switch engaged (states: $now)" ;; esac
        [ "$(merged)" -ge "$n" ] && return 0
        sleep 1
    done
}

say "dev workers 1 -> 4"
"${compose[@]}" up -d --no-recreate --scale dev-worker=4 dev-worker 2>&1 | tail -n 4
wait_merged_at_least 3
echo "states: $(states)"

say "docker kill a dev worker container mid-run, then start it again: it takes back its own name and its pending task"
docker kill "${p}_dev-worker_2" >/dev/null
sleep 3
docker start "${p}_dev-worker_2" >/dev/null
wait_merged_at_least 6
echo "states: $(states)"

say "Redis cut off its network for 10 s"
docker network disconnect "${p}_bus" "${p}_redis_1"
sleep 10
docker network connect --alias redis "${p}_bus" "${p}_redis_1"
wait_merged_at_least 9
echo "states: $(states)"

say "Redis killed (SIGKILL) and started again: the append-only file keeps the streams"
docker kill "${p}_redis_1" >/dev/null
docker start "${p}_redis_1" >/dev/null
wait_merged_at_least 12
echo "states: $(states)"

say "Redis loses its data (FLUSHALL as the admin user, as a lost volume would): re-issued within seconds"
REDISCLI_AUTH=$(sed -n 's/^admin *= *"\([0-9a-f]*\)"/\1/p' "$state/secrets/redis-secrets.toml") \
    docker exec -e REDISCLI_AUTH "${p}_redis_1" \
    redis-cli --tls --cacert /run/secrets/ca.crt -h 127.0.0.1 --user admin --no-auth-warning FLUSHALL
wait_merged_at_least 14
echo "states: $(states)"

say "Postgres restarted"
docker restart "${p}_postgres_1" >/dev/null
wait_merged_at_least 15
echo "states: $(states)"

say "dev workers 4 -> 1"
"${compose[@]}" up -d --no-recreate --scale dev-worker=1 dev-worker 2>&1 | tail -n 1

say "waiting for every task to end (at most ${timeout_secs} s)"
deadline=$((SECONDS + timeout_secs))
while [ $SECONDS -lt $deadline ]; do
    open=0
    for id in "${ids[@]}"; do
        s=$({ "$fleetctl" task "$id" --json 2>/dev/null || true; } | sed -n 's/.*"state": *"\([a-z_]*\)".*/\1/p' | head -n 1)
        case "$s" in merged|failed|blocked|cancelled) ;; *) open=$((open + 1)) ;; esac
    done
    [ "$open" = 0 ] && break
    echo "$open open; states: $(states)"
    sleep 5
done

say "checks"
bad=0
for id in "${ids[@]}"; do
    s=$("$fleetctl" task "$id" --json | sed -n 's/.*"state": *"\([a-z_]*\)".*/\1/p' | head -n 1)
    [ "$s" = merged ] || { echo "task $id ended $s, not merged"; bad=1; }
done
[ "$bad" = 0 ] || fail "not every task merged"
echo "every one of the $tasks tasks merged"
branches=$(git -c safe.directory='*' -C "$FLEET_REPOS/example.git" for-each-ref --format='%(refname)' refs/heads/agentfleet/ | wc -l)
[ "$branches" = "$tasks" ] || fail "$branches branches pushed for $tasks tasks"
for id in "${ids[@]}"; do
    git -c safe.directory='*' -C "$FLEET_REPOS/example.git" rev-parse -q --verify "refs/heads/agentfleet/task-$id" >/dev/null \
        || fail "no branch for task $id"
done
echo "each task pushed exactly one branch ($branches branches)"
# The audit trail: through a one-off container on the database network (Postgres is not
# published), as the orchestrator's role, with the CA.
# The URL passes through the environment (-e NAME), never a command line.
FLEET_DATABASE_URL=$(cat "$state/secrets/database-url-orchestrator") \
docker run --rm --network "${p}_db" --read-only --user 65532:65532 \
    -v "$state/secrets/audit.key:/run/secrets/audit.key:ro" \
    -v "$state/secrets/ca.crt:/run/secrets/ca.crt:ro" \
    -e FLEET_DATABASE_URL \
    agentfleet/fleetctl:current audit verify --audit-key-file /run/secrets/audit.key \
    || fail "fleetctl audit verify failed"
echo "the audit trail verifies"
dlq=$(REDISCLI_AUTH=$(sed -n 's/^operator *= *"\([0-9a-f]*\)"/\1/p' "$state/secrets/redis-secrets.toml") \
    docker exec -e REDISCLI_AUTH "${p}_redis_1" redis-cli --tls --cacert /run/secrets/ca.crt -h 127.0.0.1 --user operator --no-auth-warning XLEN fleet:dlq)
[ "$dlq" = 0 ] || fail "fleet:dlq holds $dlq entries"
echo "fleet:dlq is empty"
left=$(docker ps -aq --filter label=agentfleet.sandbox=1 --filter label=agentfleet.runner=chaos-runner | wc -l)
[ "$left" = 0 ] || fail "$left sandbox containers left behind"
echo "no sandbox container left"
say "passed"
