"""Celery 5 with its `auth` serializer (message signing) on the same Redis (issue 16).

Enqueues N jobs carrying a 512-byte argument with `task.delay`, signed by Celery's auth
serializer (RSA-2048 key, SHA-256 digest, a self-signed certificate in the cert store), and
consumes them with WORKERS worker processes (solo pool, prefetch 128), each job
incrementing a Redis counter. Prints "enqueue <rate>/s" (the delay calls alone) and
"end-to-end <rate>/s" (N / first delay -> counter reaches N).

Usage: python3 celery_auth.py --port PORT [--n N] [--workers W]
       (internal) python3 celery_auth.py worker --port PORT --dir DIR
"""

import argparse
import datetime
import os
import subprocess
import sys
import tempfile
import time

import redis
from celery import Celery
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

COUNTER = "peer:celery:done"


def make_identity(directory):
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "agentfleet-peer")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    os.makedirs(os.path.join(directory, "certs"), exist_ok=True)
    with open(os.path.join(directory, "key.pem"), "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    with open(os.path.join(directory, "certs", "cert.pem"), "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))


def make_app(port, directory):
    app = Celery("peer", broker=f"redis://127.0.0.1:{port}/0")
    app.conf.update(
        security_key=os.path.join(directory, "key.pem"),
        security_certificate=os.path.join(directory, "certs", "cert.pem"),
        security_cert_store=os.path.join(directory, "certs", "*.pem"),
        security_digest="sha256",
        task_serializer="auth",
        event_serializer="auth",
        accept_content=["auth"],
        task_ignore_result=True,
        worker_prefetch_multiplier=128,
        broker_connection_retry_on_startup=True,
    )
    app.setup_security()
    counter = redis.Redis(port=port)

    @app.task(name="peer.job")
    def job(payload):
        counter.incr(COUNTER)

    return app, job


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        a = argparse.ArgumentParser()
        a.add_argument("worker")
        a.add_argument("--port", type=int, required=True)
        a.add_argument("--dir", required=True)
        args = a.parse_args()
        app, _ = make_app(args.port, args.dir)
        app.worker_main(
            ["worker", "--pool=solo", "--loglevel=WARNING", "--without-heartbeat", "--without-gossip", "--without-mingle"]
        )
        return
    a = argparse.ArgumentParser()
    a.add_argument("--port", type=int, required=True)
    a.add_argument("--n", type=int, default=20000)
    a.add_argument("--workers", type=int, default=3)
    args = a.parse_args()
    directory = tempfile.mkdtemp(prefix="agentfleet-celery-")
    make_identity(directory)
    r = redis.Redis(port=args.port)
    r.flushall()
    app, job = make_app(args.port, directory)
    workers = [
        subprocess.Popen([sys.executable, __file__, "worker", "--port", str(args.port), "--dir", directory])
        for _ in range(args.workers)
    ]
    try:
        time.sleep(3)  # the workers connect and declare their queue
        payload = "x" * 512
        start = time.perf_counter()
        for _ in range(args.n):
            job.delay(payload)
        enqueued = time.perf_counter() - start
        deadline = time.monotonic() + 600
        while int(r.get(COUNTER) or 0) < args.n:
            if time.monotonic() > deadline:
                raise SystemExit(f"only {int(r.get(COUNTER) or 0)} of {args.n} jobs ran within 600 s")
            time.sleep(0.01)
        elapsed = time.perf_counter() - start
    finally:
        for w in workers:
            w.terminate()
        for w in workers:
            w.wait()
    print(f"enqueue {args.n / enqueued:.0f}/s")
    print(f"end-to-end {args.n / elapsed:.0f}/s")


if __name__ == "__main__":
    main()
