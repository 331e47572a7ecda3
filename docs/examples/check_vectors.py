#!/usr/bin/env python3
"""An independent, standard-library-only check of the envelope test vectors.

It re-implements, from docs/wire-format.md alone, the edge-key derivation (HKDF-SHA256),
the signing input, the HMAC, and the parsing of the outer frame, and checks them against
envelope/tests/vectors/*.json. It does not decode bodies (that needs a MessagePack
library); it shows that the byte-level parts of the spec are enough to interoperate.

    python3 docs/examples/check_vectors.py envelope/tests/vectors
"""
import hashlib
import hmac
import json
import struct
import sys
from pathlib import Path

DOMAIN = b"agentfleet/envelope/sig"


def hkdf_sha256(salt: bytes, ikm: bytes, info: bytes, length: int = 32) -> bytes:
    prk = hmac.new(salt, ikm, hashlib.sha256).digest()
    okm, block, counter = b"", b"", 1
    while len(okm) < length:
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        okm += block
        counter += 1
    return okm[:length]


def lp(item: bytes) -> bytes:
    return struct.pack(">I", len(item)) + item


def signing_input(v: int, kid: str, alg: str, body: bytes) -> bytes:
    return lp(DOMAIN) + lp(bytes([v])) + lp(kid.encode()) + lp(alg.encode()) + lp(body)


def read_str(buf: bytes, i: int):
    m = buf[i]
    if 0xA0 <= m <= 0xBF:
        n, i = m & 0x1F, i + 1
    elif m == 0xD9:
        n, i = buf[i + 1], i + 2
    elif m == 0xDA:
        n, i = struct.unpack(">H", buf[i + 1:i + 3])[0], i + 3
    else:
        raise ValueError(f"expected str at {i}, marker {m:#x}")
    return buf[i:i + n].decode(), i + n


def read_bin(buf: bytes, i: int):
    m = buf[i]
    if m == 0xC4:
        n, i = buf[i + 1], i + 2
    elif m == 0xC5:
        n, i = struct.unpack(">H", buf[i + 1:i + 3])[0], i + 3
    elif m == 0xC6:
        n, i = struct.unpack(">I", buf[i + 1:i + 5])[0], i + 5
    else:
        raise ValueError(f"expected bin at {i}, marker {m:#x}")
    return buf[i:i + n], i + n


def parse_frame(wire: bytes):
    if wire[0] != 0x95:
        raise ValueError("frame must be a 5-element fixarray")
    v = wire[1]
    if v > 0x7F:
        raise ValueError("version must be a positive fixint")
    kid, i = read_str(wire, 2)
    alg, i = read_str(wire, i)
    body, i = read_bin(wire, i)
    sig, i = read_bin(wire, i)
    if i != len(wire):
        raise ValueError("trailing bytes")
    return v, kid, alg, body, sig


def main(directory: str) -> int:
    d = Path(directory)
    keys = json.loads((d / "keys.json").read_text())
    master = bytes.fromhex(keys["master_secret_hex"])
    salt = keys["hkdf_salt"].encode()
    for k in keys["derivations"]:
        assert hkdf_sha256(salt, master, k["kid"].encode()).hex() == k["key_hex"], k["kid"]
    ring = {k["kid"]: k.get("key_hex") for k in keys["verifier_keyring"]}
    for vec in json.loads((d / "positive.json").read_text()):
        wire = bytes.fromhex(vec["wire_hex"])
        v, kid, alg, body, sig = parse_frame(wire)
        assert (v, kid, alg) == (1, vec["kid"], "HS256"), vec["name"]
        assert body.hex() == vec["body_hex"], vec["name"]
        assert signing_input(v, kid, alg, body).hex() == vec["signing_input_hex"], vec["name"]
        key = bytes.fromhex(ring[kid])
        assert key == hkdf_sha256(salt, master, kid.encode()), vec["name"]
        mac = hmac.new(key, signing_input(v, kid, alg, body), hashlib.sha256).digest()
        assert hmac.compare_digest(mac, sig), vec["name"]
        print(f"ok  {vec['name']}")
    print("all byte-level checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "envelope/tests/vectors"))
