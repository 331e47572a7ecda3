"""The Python baseline of the bus (issue 16): the same job through Redis Streams with
redis-py, msgpack and hmac, written the straightforward way.

A producer packs a 512-byte job with msgpack, signs it with HMAC-SHA256 and XADDs it in
pipelines of 64; CONSUMERS processes read with XREADGROUP COUNT 128, verify the HMAC,
unpack, and XACK each batch in one call. With --guard they also keep a replay guard like
the bus does (SET seen NX GET before handling, SET done after). Rate = N / (first XADD ->
last XACK), measured from the consumers' acknowledged count.

Usage: python3 baseline.py --port PORT [--n N] [--consumers C] [--guard]
Prints one line: "<rate>/s" (entries per second).
"""

import argparse
import hashlib
import hmac
import multiprocessing
import os
import time

import msgpack
import redis

KEY = b"k" * 32
STREAM = "peer:baseline"
GROUP = "g"


def consume(port, name, n, guard, done_counter):
    r = redis.Redis(port=port)
    acked = 0
    while True:
        with done_counter.get_lock():
            if done_counter.value >= n:
                return
        reply = r.xreadgroup(GROUP, name, {STREAM: ">"}, count=128, block=200)
        if not reply:
            continue
        entries = reply[0][1]
        ids, ok = [], []
        for entry_id, fields in entries:
            frame = fields[b"env"]
            body, tag = frame[:-32], frame[-32:]
            if not hmac.compare_digest(hmac.new(KEY, body, hashlib.sha256).digest(), tag):
                raise SystemExit("bad signature")
            job = msgpack.unpackb(body)
            ids.append(entry_id)
            ok.append(job["id"])
        if guard:
            p = r.pipeline(transaction=False)
            for i, job_id in zip(ids, ok):
                p.set(f"peer:seen:{job_id}", i, nx=True, get=True, px=600000)
            p.execute()
        p = r.pipeline(transaction=False)
        if guard:
            for job_id in ok:
                p.set(f"peer:done:{job_id}", 1, px=600000)
        p.xack(STREAM, GROUP, *ids)
        p.execute()
        acked += len(ids)
        with done_counter.get_lock():
            done_counter.value += len(ids)


def main():
    a = argparse.ArgumentParser()
    a.add_argument("--port", type=int, required=True)
    a.add_argument("--n", type=int, default=100000)
    a.add_argument("--consumers", type=int, default=3)
    a.add_argument("--guard", action="store_true")
    args = a.parse_args()
    r = redis.Redis(port=args.port)
    r.delete(STREAM)
    r.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
    done = multiprocessing.Value("q", 0)
    procs = [
        multiprocessing.Process(target=consume, args=(args.port, f"c{i}", args.n, args.guard, done))
        for i in range(args.consumers)
    ]
    for p in procs:
        p.start()
    summary = "x" * 512
    start = time.perf_counter()
    p = r.pipeline(transaction=False)
    for i in range(args.n):
        body = msgpack.packb({"id": f"{os.getpid()}-{i}", "type": "task.result", "summary": summary})
        frame = body + hmac.new(KEY, body, hashlib.sha256).digest()
        p.xadd(STREAM, {"env": frame}, maxlen=1000000, approximate=True)
        if (i + 1) % 64 == 0:
            p.execute()
    p.execute()
    for p in procs:
        p.join()
    elapsed = time.perf_counter() - start
    pending = r.xpending(STREAM, GROUP)["pending"]
    if pending:
        raise SystemExit(f"{pending} entries still pending")
    print(f"{args.n / elapsed:.0f}/s")


if __name__ == "__main__":
    main()
