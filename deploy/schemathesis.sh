#!/usr/bin/env bash
# Fuzzes the orchestrator's HTTP API against its own OpenAPI document with schemathesis
# (from PyPI), once with a token of each role, and fails if any request gets a 5xx, a
# status code the document does not list, or an answer that breaks the document.
#
#   1. Installs schemathesis into a fresh venv in a temporary directory (cached nowhere).
#   2. Builds and starts the live API (orchestrator/examples/live_api.rs: the real router
#      on throwaway Postgres and Redis from fleet-testkit, one task with an open question).
#   3. Issues a viewer, an operator and an admin token (`fleetctl token issue`).
#   4. Runs `schemathesis run http://…/v1/openapi.json` with each token: checks
#      not_a_server_error, status_code_conformance and response_schema_conformance,
#      SCHEMATHESIS_MAX_EXAMPLES examples per operation (default 50).
#
# deploy/test.sh runs it after the nextest run. Needs python3 with venv, pip's index,
# postgresql and redis-server (as the tests do).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

step() { printf '\n==> %s\n' "$*"; }
fail() { printf 'deploy/schemathesis.sh: %s\n' "$*" >&2; exit 1; }

max_examples=${SCHEMATHESIS_MAX_EXAMPLES:-50}
work=$(mktemp -d /tmp/agentfleet-schemathesis.XXXXXX)
[ "$(id -u)" -eq 0 ] && chmod 755 "$work"
server_pid=
cleanup() {
    if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then
        kill -TERM "$server_pid" 2>/dev/null || true
        wait "$server_pid" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT

command -v python3 >/dev/null 2>&1 || fail "python3 not found (apt-get install python3 python3-venv)."

step "Installing schemathesis from PyPI into $work/venv"
python3 -m venv "$work/venv" || fail "cannot create a venv (apt-get install python3-venv)."
"$work/venv/bin/pip" install --quiet --no-cache-dir schemathesis || fail "pip could not install schemathesis."
st="$work/venv/bin/schemathesis"
"$st" --version

step "Building and starting the live API (orchestrator/examples/live_api.rs)"
cargo build --locked -q -p fleetctl -p orchestrator --example live_api
bin=${CARGO_TARGET_DIR:-target}/debug
"$bin/examples/live_api" "$work" >"$work/server.log" 2>&1 &
server_pid=$!
for _ in $(seq 1 120); do
    [ -s "$work/url" ] && break
    kill -0 "$server_pid" 2>/dev/null || { cat "$work/server.log" >&2; fail "the live API exited before serving."; }
    sleep 0.5
done
[ -s "$work/url" ] || { cat "$work/server.log" >&2; fail "the live API did not start within 60 s."; }
url=$(cat "$work/url")
echo "API at $url"

status=0
for role in viewer operator admin; do
    token=$("$bin/fleetctl" token issue --role "$role" --sub "schemathesis-$role" --ttl 1h --secret-file "$work/jwt.secret")
    step "schemathesis as $role ($max_examples examples per operation)"
    # From the work directory: schemathesis keeps a crash cache in ./.schemathesis.
    if (cd "$work" && NO_COLOR=1 "$st" run "$url/v1/openapi.json" \
        --url "$url" \
        --header "Authorization: Bearer $token" \
        --checks not_a_server_error,status_code_conformance,response_schema_conformance \
        --max-examples "$max_examples" \
        --seed 1 \
        --generation-database none \
        --report junit --report-dir "$work/report-$role"); then
        echo "schemathesis as $role: passed"
    else
        echo "schemathesis as $role: FAILED" >&2
        status=1
    fi
done

if grep -q ' ERROR ' "$work/server.log"; then
    grep ' ERROR ' "$work/server.log" | head -n 20 >&2
    echo "deploy/schemathesis.sh: the API logged errors (above)." >&2
    status=1
fi
[ "$status" -eq 0 ] || fail "schemathesis found problems (see above)."
echo "schemathesis: every role passed."
