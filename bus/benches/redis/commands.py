#!/usr/bin/python3
"""Redis's own cost of two command shapes the bus chose, each against the shape it replaced,
measured alone (its own redis-server, no persistence, on a free loopback port; the shapes
alternated, ROUNDS times). Prints Redis's CPU per item (`INFO cpu`), its time in the
command per item (`INFO commandstats`) and, for the guard, memory per id (`used_memory`).
Needs redis-server and python3-redis (Debian). Results: docs/benchmarks.md.

    bus/benches/redis/commands.py [N] [ROUNDS]      # defaults 200000, 2

- guard fields: N fresh ids marked the way `bus::guard::mark` does, pipelines of 128
  `HSETNX fleet:seen:{fleet:results}:orchestrator:<bucket> <id> <entry id>` plus one
  `PEXPIREAT`, a new bucket every 40,000 ids; the id as 32 hex digits (`hex`, before) or
  as its 16 bytes (`bin`, now).
- trimming: N 749-byte entries `XADD`ed in pipelines of 64, as `bus::Publisher` does, with
  `MAXLEN ~ 1000000` on every `XADD` (`every`, before) or on the last of each pipeline
  (`last`, now).
"""
import socket, subprocess, sys, tempfile, time, uuid

import redis

N = int(sys.argv[1]) if len(sys.argv) > 1 else 200_000
ROUNDS = int(sys.argv[2]) if len(sys.argv) > 2 else 2
BATCH = 128


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(r, layout):
    r.flushall()
    r.config_resetstat()
    mem0 = r.info("memory")["used_memory"]
    cpu = lambda: (lambda i: i["used_cpu_user"] + i["used_cpu_sys"])(r.info("cpu"))
    c0 = cpu()
    bucket = 1_733_330_010_000
    done = 0
    while done < N:
        ids = [uuid.uuid4() for _ in range(BATCH)]
        key = f"fleet:seen:{{fleet:results}}:orchestrator:{bucket}"
        p = r.pipeline(transaction=False)
        for j, u in enumerate(ids):
            p.hsetnx(key, u.bytes if layout == "bin" else u.hex, f"1733330000000-{done + j}")
        p.execute_command("PEXPIREAT", key, int(time.time() * 1000) + 600_000)
        p.execute()
        done += BATCH
        if done % 40_000 < BATCH:
            bucket += 10_000
    c1 = cpu()
    hsetnx = r.info("commandstats")["cmdstat_hsetnx"]["usec"] / done
    mem = (r.info("memory")["used_memory"] - mem0) / done
    print(f"guard {layout:>4}: Redis CPU {(c1 - c0) * 1e6 / done:.2f} µs/id, HSETNX {hsetnx:.2f} µs/id, {mem:.0f} B/id")


def measure_trim(r, shape):
    r.flushall()
    r.config_resetstat()
    value = b"x" * 749
    cpu = lambda: (lambda i: i["used_cpu_user"] + i["used_cpu_sys"])(r.info("cpu"))
    c0 = cpu()
    done = 0
    while done < N:
        p = r.pipeline(transaction=False)
        for j in range(64):
            trim = shape == "every" or j == 63
            p.execute_command("XADD", "fleet:results", *(["MAXLEN", "~", 1_000_000] if trim else []), "*", "env", value)
        p.execute()
        done += 64
    c1 = cpu()
    xadd = r.info("commandstats")["cmdstat_xadd"]["usec"] / done
    print(f"trim on {shape:>5}: Redis CPU {(c1 - c0) * 1e6 / done:.2f} µs/entry, XADD {xadd:.2f} µs/entry")


def main():
    port = free_port()
    with tempfile.TemporaryDirectory() as d:
        server = subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", d],
            stdout=subprocess.DEVNULL,
        )
        try:
            r = redis.Redis(port=port)
            for _ in range(100):
                try:
                    r.ping()
                    break
                except redis.ConnectionError:
                    time.sleep(0.05)
            for _ in range(ROUNDS):
                for layout in ("hex", "bin"):
                    measure(r, layout)
            for _ in range(ROUNDS):
                for shape in ("every", "last"):
                    measure_trim(r, shape)
        finally:
            server.terminate()
            server.wait()


if __name__ == "__main__":
    main()
