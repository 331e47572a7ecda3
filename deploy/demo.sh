#!/usr/bin/env bash
# The agentfleet demo: the one command that shows the fleet working end to end on a fresh machine.
#
# The fleet's processes (bus, orchestrator, workers, budget) are not built yet. Until they are,
# this demo runs what exists and says so: it makes a master secret, derives per-process
# keysets with `fleetctl keys`, and shows a dev worker's envelope verified by the
# orchestrator while forged, replayed, misrouted and stale ones are refused.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== agentfleet demo (foundation only: envelopes and keys; the running fleet comes with later issues)"
echo "== building fleetctl and the demo program (release)"
cargo build --release --locked -q -p fleetctl --bin fleetctl
cargo build --release --locked -q -p envelope --example demo

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
fleetctl=target/release/fleetctl

echo "== operator: new master secret, keysets for the dev worker and the orchestrator"
"$fleetctl" keys master new --out "$work/master.toml"
"$fleetctl" keys derive --master "$work/master.toml" --process dev --out "$work/dev.keyset.toml"
"$fleetctl" keys derive --master "$work/master.toml" --process orchestrator --out "$work/orchestrator.keyset.toml"
"$fleetctl" keys list --keyset "$work/dev.keyset.toml"

echo "== a dev worker talks to the orchestrator"
target/release/examples/demo "$work/dev.keyset.toml" "$work/orchestrator.keyset.toml" config/permissions.toml

echo "== done. Not shown yet (later issues): Redis Streams bus, orchestrator, workers, budget and kill switch."
