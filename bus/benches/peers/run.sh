#!/usr/bin/env bash
# The bus next to its peers on the same machine, in one run (issue 16, item 4):
#
#   raw XADD        redis-benchmark -c 50 -P 16 XADD of a 512-byte value (the baseline)
#   python          redis-py + msgpack + hmac: 512-byte jobs signed with HMAC-SHA256,
#                   XADD in pipelines of 64, 3 consumer processes (XREADGROUP COUNT 128,
#                   verify, XACK); "+ guard" adds a replay guard like the bus's
#   celery auth     Celery 5 with the auth serializer (RSA-2048 signatures): enqueue rate
#                   and end to end with 3 solo-pool workers
#   agentfleet bus  `cargo bench -p bus --bench bus -- --only raw,signed-batched`
#                   (its own redis-server and its own raw XADD row)
#
# All but the bus's rows use one redis-server started here (loopback, no persistence,
# FLUSHALL between rows). Ratios are to the raw XADD of the same server in the same run.
# Needs Debian's python3-redis, python3-msgpack, python3-celery and python3-cryptography
# (installed if missing; run as root). Usage: [RUNS=3] bus/benches/peers/run.sh [N]
# (default 100000; Celery gets N/10, it is two orders of magnitude slower). Prints medians of
# RUNS runs with every run's value, and ratios of medians to the raw XADD median.
set -euo pipefail
cd "$(dirname "$0")/../../.."
n=${1:-100000}
runs=${RUNS:-3}
py=/usr/bin/python3
need=()
for m in redis:python3-redis msgpack:python3-msgpack celery:python3-celery cryptography:python3-cryptography; do
    "$py" -c "import ${m%%:*}" 2>/dev/null || need+=("${m#*:}")
done
if [ "${#need[@]}" -gt 0 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need[@]}" >&2
fi
port=$("$py" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
dir=$(mktemp -d)
redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no --dir "$dir" --daemonize no >"$dir/redis.log" 2>&1 &
redis_pid=$!
trap 'kill $redis_pid 2>/dev/null || true; wait $redis_pid 2>/dev/null || true; rm -rf "$dir"' EXIT
for _ in $(seq 50); do redis-cli -p "$port" ping >/dev/null 2>&1 && break; sleep 0.1; done

raw() {
    redis-cli -p "$port" flushall >/dev/null
    redis-benchmark -h 127.0.0.1 -p "$port" -c 50 -P 16 -n "$n" -q --csv XADD bench:raw '*' env "$(printf 'x%.0s' $(seq 512))" \
        | tail -n 1 | cut -d, -f2 | tr -d '"' | cut -d. -f1
}
python_row() { redis-cli -p "$port" flushall >/dev/null; "$py" bus/benches/peers/baseline.py --port "$port" --n "$n" "$@" | tr -d '/s'; }

# Per run, one value per row; the rows interleave so that a drift of the host shows in all.
declare -A vals
for run in $(seq "$runs"); do
    vals[raw]+="$(raw) "
    vals[python]+="$(python_row) "
    vals[guard]+="$(python_row --guard) "
    out=$("$py" bus/benches/peers/celery_auth.py --port "$port" --n "$((n / 10))" 2>/dev/null)
    vals[enqueue]+="$(echo "$out" | sed -n 's/^enqueue \([0-9]*\).*/\1/p') "
    vals[celery]+="$(echo "$out" | sed -n 's/^end-to-end \([0-9]*\).*/\1/p') "
    echo "run $run of $runs done" >&2
done
"$py" - "${vals[raw]}" "${vals[python]}" "${vals[guard]}" "${vals[enqueue]}" "${vals[celery]}" <<'PY'
import statistics, sys
names = ["raw XADD (redis-benchmark)", "python: redis-py + msgpack + hmac", "python + replay guard",
         "celery auth: enqueue", "celery auth: end to end"]
rows = [[int(v) for v in a.split()] for a in sys.argv[1:]]
raw = statistics.median(rows[0])
print("| row | median | per run | / raw XADD |")
print("|---|---:|---|---:|")
for name, vals in zip(names, rows):
    m = statistics.median(vals)
    print(f"| {name} | {m:,.0f}/s | {' / '.join(f'{v:,}' for v in vals)} | {m / raw:.3f}× |")
PY
echo
echo "agentfleet bus (its own redis-server, same machine, right after):"
cargo bench -q -p bus --bench bus -- --runs "$runs" --n "$n" --only raw,signed-batched 2>&1 | grep -E '^\|' || true
