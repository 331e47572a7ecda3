#!/usr/bin/env python3
"""A second, independent implementation of the agentfleet wire format, checked against
every test vector in envelope/tests/vectors/.

Written from docs/wire-format.md alone, with nothing but the Python standard library
(3.11 or later, for tomllib): the edge-key derivation (HKDF-SHA256), a strict MessagePack
reader, the frame and body rules of §2-§3, the signing input and HMAC of §5, every check of
§6 in its order with its code, and the reference body encoding. For each vector it checks:

- keys.json: every derivation;
- positive.json: the body this encoder writes from `fields`, the signing input, the
  signature and the frame are the stated bytes, and the frame verifies to `fields`;
- accepted.json: the frame verifies to `fields`;
- negative.json: verification fails with exactly `expected_error`.

    python3 docs/examples/check_vectors.py envelope/tests/vectors
"""
import hashlib
import hmac
import json
import re
import struct
import sys
import tomllib
import uuid
from pathlib import Path

DOMAIN = b"agentfleet/envelope/sig"
ROLES = {"orchestrator", "budget", "dev", "qa", "review", "refactor"}
STATUSES = {"success", "failure", "error"}
INSTANCE = re.compile(r"[A-Za-z0-9._-]{1,64}")

# §3: body keys in wire order, with their type and whether they are required.
BODY = [
    ("id", "uuid", True),
    ("type", "type", True),
    ("from", "from", True),
    ("to", "role", True),
    ("task_id", "uuid", False),
    ("causation_id", "uuid", False),
    ("issued_at_ms", "u64", True),
    ("ttl_ms", "u64", True),
    ("kill_epoch", "u64", True),
    ("traceparent", "str", False),
    ("lease", "str", False),
    ("payload", "payload", True),
]
# §3.3: payload keys in wire order; "?" optional, "[]" a list left out when empty.
PAYLOADS = {
    "task.assign": ["attempt u32", "instructions str", "workspace str", "repository? str", "test_command? str",
                    "findings[] strs", "scope[] strs", "change? bin", "change_sha256? str"],
    "task.result": ["attempt u32", "status status", "summary str", "findings[] strs", "diff? bin", "log? bin",
                    "change_sha256? str", "calls[] calls", "containment[] strs"],
    "heartbeat": ["seq u64", "busy bool"],
    "question": ["text str"],
    "tool.request": ["request_id uuid", "action str", "input str"],
    "tool.response": ["request_id uuid", "ok bool", "output str"],
    "usage": ["role role", "model str", "input_tokens u64", "output_tokens u64", "cost_micro_usd u64"],
    "outcome": ["role role", "status status", "error_kind? str"],
    "control.pause": ["epoch u64", "reason str", "by? str"],
    "control.resume": ["epoch u64", "by? str"],
    "incident.opened": ["incident uuid", "severity str", "trigger str", "title str", "repository? str",
                        "freezes_merges bool", "opened_at_ms u64", "opened_by str", "tasks[] uuids"],
}
PAYLOADS = {
    t: [(k.rstrip("?[]"), ty, not k.endswith(("?", "[]"))) for k, ty in (e.split() for e in keys)]
    for t, keys in PAYLOADS.items()
}
# §3.3: one entry of task.result's `calls`, keys in wire order.
CALL = [("tool", "str", True), ("args", "str", True), ("verdict", "verdict", True), ("reason", "str", False),
        ("ms", "u64", True)]
VERDICTS = {"ok", "refused", "failed"}


class Reject(Exception):
    """A verification failure with its §6 code."""

    def __init__(self, code: str, why: str):
        super().__init__(f"{code}: {why}")
        self.code = code


def decode_error(why: str) -> Reject:
    return Reject("decode", why)


# ---- keys and signature (§4, §5) ----

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


def signing_input(v: int, kid: bytes, alg: bytes, body: bytes) -> bytes:
    return lp(DOMAIN) + lp(bytes([v])) + lp(kid) + lp(alg) + lp(body)


# ---- MessagePack ----

class Map(list):
    """A map as its (key, value) pairs in wire order, duplicates kept."""


class Reader:
    def __init__(self, buf: bytes):
        self.buf, self.i = buf, 0

    def take(self, n: int) -> bytes:
        if self.i + n > len(self.buf):
            raise decode_error("ends inside a value")
        out = self.buf[self.i:self.i + n]
        self.i += n
        return out

    def uint(self, n: int) -> int:
        return int.from_bytes(self.take(n), "big")

    def text(self, n: int) -> str:
        try:
            return self.take(n).decode("utf-8")
        except UnicodeDecodeError as e:
            raise decode_error(f"a str is not UTF-8 ({e})")

    def value(self):
        """One value of a body. nil, floats and ext never appear in a body (§3): decode."""
        m = self.uint(1)
        if m <= 0x7F:
            return m
        if m >= 0xE0:
            return m - 0x100
        if 0x80 <= m <= 0x8F:
            return Map((self.value(), self.value()) for _ in range(m & 0x0F))
        if 0x90 <= m <= 0x9F:
            return [self.value() for _ in range(m & 0x0F)]
        if 0xA0 <= m <= 0xBF:
            return self.text(m & 0x1F)
        width = {0xC4: 1, 0xC5: 2, 0xC6: 4}.get(m)
        if width:
            return self.take(self.uint(width))
        width = {0xD9: 1, 0xDA: 2, 0xDB: 4}.get(m)
        if width:
            return self.text(self.uint(width))
        if m in (0xC2, 0xC3):
            return m == 0xC3
        width = {0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8}.get(m)
        if width:
            return self.uint(width)
        width = {0xD0: 1, 0xD1: 2, 0xD2: 4, 0xD3: 8}.get(m)
        if width:
            return int.from_bytes(self.take(width), "big", signed=True)
        if m in (0xDC, 0xDD):
            return [self.value() for _ in range(self.uint(2 if m == 0xDC else 4))]
        if m in (0xDE, 0xDF):
            return Map((self.value(), self.value()) for _ in range(self.uint(2 if m == 0xDE else 4)))
        raise decode_error(f"marker {m:#04x} (nil, float, ext or reserved) in a body")


# ---- frame (§2) ----

def parse_frame(wire: bytes):
    """[v, kid, alg, body, sig] in the one byte form §2 allows; anything else is decode."""
    r = Reader(wire)
    if r.uint(1) != 0x95:
        raise decode_error("a frame starts with 0x95")
    v = r.uint(1)
    if v == 0xCC:
        v = r.uint(1)
        if v < 0x80:
            raise decode_error("v as a uint8 where a positive fixint fits")
    elif v > 0x7F:
        raise decode_error("v is not a positive fixint or uint8")

    def header(kind: str, short: dict, fix: range | None) -> int:
        m = r.uint(1)
        if fix is not None and m in fix:
            return m & 0x1F
        if m not in short:
            raise decode_error(f"{kind} expected, marker {m:#04x}")
        width, least = short[m]
        n = r.uint(width)
        if n < least:
            raise decode_error(f"{kind} header longer than needed")
        return n

    str_headers = {0xD9: (1, 32), 0xDA: (2, 256), 0xDB: (4, 65536)}
    bin_headers = {0xC4: (1, 0), 0xC5: (2, 256), 0xC6: (4, 65536)}
    kid = r.take(header("str", str_headers, range(0xA0, 0xC0)))
    alg = r.take(header("str", str_headers, range(0xA0, 0xC0)))
    body = r.take(header("bin", bin_headers, None))
    sig = r.take(header("bin", bin_headers, None))
    if r.i != len(wire):
        raise decode_error("bytes after the frame")
    for item in (kid, alg):
        try:
            item.decode("utf-8")
        except UnicodeDecodeError:
            raise decode_error("kid or alg is not UTF-8")
    return v, kid, alg, body, sig


# ---- body (§3) ----

def check_value(ty: str, x, where: str):
    """Returns x as the JSON notation of the vectors (UUIDs as text, bin as byte lists)."""
    if ty == "calls":
        if type(x) is not list:
            raise decode_error(f"{where}: not an array: {x!r}")
        return [check_map(c, CALL, f"{where}[{i}]", lambda k, ty, v: check_value(ty, v, f"{where}[{i}].{k}"))
                for i, c in enumerate(x)]
    ok = {
        "u32": lambda: type(x) is int and 0 <= x < 1 << 32,
        "u64": lambda: type(x) is int and 0 <= x < 1 << 64,
        "bool": lambda: type(x) is bool,
        "str": lambda: type(x) is str,
        "bin": lambda: type(x) is bytes,
        "uuid": lambda: type(x) is bytes and len(x) == 16,
        "strs": lambda: type(x) is list and all(type(s) is str for s in x),
        "uuids": lambda: type(x) is list and all(type(b) is bytes and len(b) == 16 for b in x),
        "role": lambda: type(x) is str and x in ROLES,
        "type": lambda: type(x) is str and x in PAYLOADS,
        "status": lambda: type(x) is str and x in STATUSES,
        "verdict": lambda: type(x) is str and x in VERDICTS,
    }[ty]()
    if not ok:
        raise decode_error(f"{where}: not a {ty}: {x!r}")
    if ty == "uuid":
        return str(uuid.UUID(bytes=x))
    if ty == "uuids":
        return [str(uuid.UUID(bytes=b)) for b in x]
    if ty == "bin":
        return list(x)
    return x


def check_map(m, schema, where: str, value) -> dict:
    """A map with str keys from `schema` (name, type, required), each at most once."""
    if type(m) is not Map:
        raise decode_error(f"{where} is not a map")
    types = {k: ty for k, ty, _ in schema}
    out = {}
    for k, x in m:
        if type(k) is not str or k not in types:
            raise decode_error(f"{where}: unknown key {k!r}")
        if k in out:
            raise decode_error(f"{where}: duplicate key {k!r}")
        out[k] = value(k, types[k], x)
    for k, _, required in schema:
        if required and k not in out:
            raise decode_error(f"{where}: missing key {k!r}")
    return out


def decode_body(body: bytes) -> dict:
    r = Reader(body)
    m = r.value()
    if r.i != len(body):
        raise decode_error("bytes after the body map")
    seen = {}

    def value(k, ty, x):
        if ty == "from":
            f = check_map(x, [("role", "role", True), ("instance", "str", True)], "from",
                          lambda k, ty, x: check_value(ty, x, f"from.{k}"))
            if not INSTANCE.fullmatch(f["instance"]):
                raise decode_error(f"bad instance {f['instance']!r}")
            return f
        if ty == "payload":
            if "type" not in seen:
                raise decode_error("payload before type")
            p = check_map(x, PAYLOADS[seen["type"]], "payload", lambda k, ty, x: check_value(ty, x, f"payload.{k}"))
            return {k: v for k, v in p.items() if v != []}  # an empty list is the same as an absent one
        seen[k] = check_value(ty, x, k)
        return seen[k]

    return check_map(m, BODY, "body", value)


def encode_body(fields: dict) -> bytes:
    """The reference encoding (§3): fixed key order, absent keys and empty lists left out,
    shortest headers and integers."""

    def enc(ty: str, x) -> bytes:
        if ty in ("u32", "u64"):
            if x < 0x80:
                return bytes([x])
            for marker, fmt, top in ((0xCC, ">B", 1 << 8), (0xCD, ">H", 1 << 16), (0xCE, ">I", 1 << 32)):
                if x < top:
                    return bytes([marker]) + struct.pack(fmt, x)
            return b"\xcf" + struct.pack(">Q", x)
        if ty == "bool":
            return b"\xc3" if x else b"\xc2"
        if ty in ("str", "role", "type", "status", "verdict"):
            b = x.encode()
            n = len(b)
            head = bytes([0xA0 | n]) if n < 32 else b"\xd9" + bytes([n]) if n < 256 else b"\xda" + struct.pack(">H", n)
            return head + b
        if ty in ("bin", "uuid"):
            b = uuid.UUID(x).bytes if ty == "uuid" else bytes(x)
            return (b"\xc4" + bytes([len(b)]) if len(b) < 256 else b"\xc5" + struct.pack(">H", len(b))) + b
        if ty == "strs":
            return bytes([0x90 | len(x)]) + b"".join(enc("str", s) for s in x)
        if ty == "uuids":
            head = bytes([0x90 | len(x)]) if len(x) < 16 else b"\xdc" + struct.pack(">H", len(x))
            return head + b"".join(enc("uuid", u) for u in x)
        if ty == "calls":
            head = bytes([0x90 | len(x)]) if len(x) < 16 else b"\xdc" + struct.pack(">H", len(x))
            return head + b"".join(mapping(CALL, c, lambda k, ty, v: enc(ty, v)) for c in x)
        raise ValueError(ty)

    def mapping(schema, values, inner) -> bytes:
        present = [(k, ty) for k, ty, _ in schema if values.get(k) not in (None, [])]
        return bytes([0x80 | len(present)]) + b"".join(enc("str", k) + inner(k, ty, values[k]) for k, ty in present)

    def value(k, ty, x):
        if ty == "from":
            return mapping([("role", "role", 1), ("instance", "str", 1)], x, lambda k, ty, x: enc(ty, x))
        if ty == "payload":
            return mapping(PAYLOADS[fields["type"]], x, lambda k, ty, x: enc(ty, x))
        return enc(ty, x)

    return mapping(BODY, fields, value)


# ---- verification (§6) ----

class Verifier:
    def __init__(self, keys: dict, root: Path):
        self.salt = keys["hkdf_salt"].encode()
        self.ring = {k["kid"]: (None if k.get("retired") else bytes.fromhex(k["key_hex"]))
                     for k in keys["verifier_keyring"]}
        self.rules = tomllib.loads((root / keys["permissions"]).read_text())["rule"]
        self.cfg = keys["verifier_config"]

    def permits(self, frm: str, to: str, stream: str, ty: str) -> bool:
        def matches(pattern: str) -> bool:
            if pattern.endswith("*"):
                return stream.startswith(pattern[:-1]) and len(stream) > len(pattern) - 1
            return stream == pattern

        return any(r["from"] == frm and r["to"] == to and ty in r["types"] and matches(r["stream"])
                   for r in self.rules)

    def verify(self, wire: bytes, stream: str, now: int, epoch: int, max_size=None, seen=()) -> tuple[dict, str]:
        if len(wire) > (max_size or self.cfg["max_size"]):
            raise Reject("too_large", f"{len(wire)} bytes")
        v, kid, alg, body, sig = parse_frame(wire)
        if v != 1:
            raise Reject("unsupported_version", str(v))
        if alg != b"HS256":
            raise Reject("unsupported_alg", repr(alg))
        if len(sig) != 32:
            raise decode_error(f"a {len(sig)}-byte sig")
        fields = decode_body(body)
        kid_text = kid.decode()
        if kid_text not in self.ring:
            raise Reject("unknown_kid", kid_text)
        key = self.ring[kid_text]
        if key is None:
            raise Reject("retired_kid", kid_text)
        mac = hmac.new(key, signing_input(v, kid, alg, body), hashlib.sha256).digest()
        if not hmac.compare_digest(mac, sig):
            raise Reject("bad_signature", kid_text)
        edge_from, edge_to = kid_text.rsplit(":", 1)[0].split(">")
        frm, to, ty = fields["from"]["role"], fields["to"], fields["type"]
        if (frm, to) != (edge_from, edge_to):
            raise Reject("edge_mismatch", f"{frm}>{to} under {kid_text}")
        if not self.permits(frm, to, stream, ty):
            raise Reject("forbidden_type", f"{frm}>{to} {ty} on {stream}")
        skew, issued, ttl = self.cfg["skew_ms"], fields["issued_at_ms"], fields["ttl_ms"]
        if ttl > self.cfg["max_ttl_ms"]:
            raise Reject("ttl_too_long", str(ttl))
        if issued > now + skew:
            raise Reject("future_dated", str(issued - now))
        if now > issued + ttl + skew:
            raise Reject("expired", str(now - issued - ttl - skew))
        if fields["kill_epoch"] < epoch:
            raise Reject("stale_epoch", f"{fields['kill_epoch']} < {epoch}")
        if fields["id"] in seen:
            raise Reject("replay", fields["id"])
        return fields, kid_text


def main(directory: str) -> int:
    d = Path(directory)
    root = Path(__file__).resolve().parents[2]
    load = lambda name: json.loads((d / name).read_text())
    keys = load("keys.json")
    master, salt = bytes.fromhex(keys["master_secret_hex"]), keys["hkdf_salt"].encode()
    for k in keys["derivations"]:
        assert hkdf_sha256(salt, master, k["kid"].encode()).hex() == k["key_hex"], k["kid"]
    for k in keys["verifier_keyring"]:
        if not k.get("retired"):
            assert hkdf_sha256(salt, master, k["kid"].encode()).hex() == k["key_hex"], k["kid"]
    verifier = Verifier(keys, root)
    failures = []

    def check(kind: str, vec: dict, test):
        try:
            test()
        except (AssertionError, Reject) as e:
            failures.append(f"{kind} {vec['name']}: {e!r}")

    def positive(vec):
        body = encode_body(vec["fields"])
        assert body.hex() == vec["body_hex"], "body bytes"
        v, kid, alg, frame_body, sig = parse_frame(bytes.fromhex(vec["wire_hex"]))
        assert (v, kid.decode(), alg) == (1, vec["kid"], b"HS256"), "frame header"
        assert frame_body == body, "frame body"
        assert signing_input(v, kid, alg, body).hex() == vec["signing_input_hex"], "signing input"
        key = hkdf_sha256(salt, master, kid)
        assert key.hex() == vec["key_hex"], "key"
        assert hmac.new(key, signing_input(v, kid, alg, body), hashlib.sha256).hexdigest() == vec["signature_hex"]
        accepted(vec)

    def accepted(vec):
        fields, kid = verifier.verify(bytes.fromhex(vec["wire_hex"]), vec["stream"], vec["now_ms"], vec["kill_epoch"])
        assert (fields, kid) == (vec["fields"], vec["kid"]), f"verified content {fields}"

    def negative(vec):
        try:
            verifier.verify(bytes.fromhex(vec["wire_hex"]), vec["stream"], vec["now_ms"], vec["kill_epoch"],
                            vec.get("max_size"), set(vec.get("seen_ids", [])))
        except Reject as e:
            assert e.code == vec["expected_error"], f"got {e}, expected {vec['expected_error']}"
            return
        raise AssertionError(f"verified, expected {vec['expected_error']}")

    counts = {}
    for kind, test in (("positive", positive), ("accepted", accepted), ("negative", negative)):
        vectors = load(f"{kind}.json")
        counts[kind] = len(vectors)
        for vec in vectors:
            check(kind, vec, lambda: test(vec))
    for f in failures:
        print(f"FAIL {f}")
    summary = ", ".join(f"{n} {kind}" for kind, n in counts.items())
    if failures:
        print(f"{len(failures)} of {sum(counts.values())} vectors failed ({summary})")
        return 1
    print(f"all {sum(counts.values())} vectors agree ({summary}; {len(keys['derivations'])} derivations)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "envelope/tests/vectors"))
