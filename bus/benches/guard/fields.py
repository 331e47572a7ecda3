#!/usr/bin/python3
"""Redis's cost per replay-guard write, by how the envelope id is written as the field.

Starts its own redis-server (no persistence) on a free loopback port, then for each
layout marks N fresh ids the way `bus::guard::mark` does: pipelines of 128 `HSETNX
fleet:seen:{fleet:results}:orchestrator:<bucket> <id> <entry id>` plus one `PEXPIREAT`,
a new bucket every 40,000 ids. Prints Redis's CPU per id (`INFO cpu`), its time in
`HSETNX` per id (`INFO commandstats`) and memory per id (`used_memory`), each layout
measured ROUNDS times, alternating. Needs redis-server and python3-redis (Debian).

    bus/benches/guard/fields.py [N] [ROUNDS]      # defaults 200000, 2

Layouts: `hex` = 32 hex digits (the guard before this change), `bin` = the id's 16 bytes
(the guard now). Results: docs/benchmarks.md ("guard fields").
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
    print(f"{layout:>4}: Redis CPU {(c1 - c0) * 1e6 / done:.2f} µs/id, HSETNX {hsetnx:.2f} µs/id, {mem:.0f} B/id")


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
        finally:
            server.terminate()
            server.wait()


if __name__ == "__main__":
    main()
