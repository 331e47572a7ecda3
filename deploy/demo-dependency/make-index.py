"""Builds the demo's package index: a wheel of demogreet and a PEP 503 simple index.

Usage: python3 make-index.py SOURCE_DIR OUT_DIR
Writes OUT_DIR/files/demogreet-1.0-py3-none-any.whl and OUT_DIR/simple/demogreet/index.html,
and prints "demogreet <sha256 of the wheel>". The wheel is byte-for-byte reproducible (fixed
timestamps and modes), so its hash is the same on every machine.
"""

import base64
import hashlib
import io
import os
import sys
import zipfile

NAME, VERSION = "demogreet", "1.0"


def entry(path):
    info = zipfile.ZipInfo(path, date_time=(1980, 1, 1, 0, 0, 0))
    info.external_attr = 0o644 << 16
    info.compress_type = zipfile.ZIP_STORED
    return info


def wheel(source):
    dist = f"{NAME}-{VERSION}.dist-info"
    files = {f"{NAME}/__init__.py": open(os.path.join(source, NAME, "__init__.py"), "rb").read()}
    files[f"{dist}/METADATA"] = f"Metadata-Version: 2.1\nName: {NAME}\nVersion: {VERSION}\n".encode()
    files[f"{dist}/WHEEL"] = b"Wheel-Version: 1.0\nGenerator: agentfleet-demo\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    record = []
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    record.append(f"{dist}/RECORD,,")
    files[f"{dist}/RECORD"] = ("\n".join(record) + "\n").encode()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for path, data in files.items():
            z.writestr(entry(path), data)
    return buf.getvalue()


def main():
    source, out = sys.argv[1], sys.argv[2]
    data = wheel(source)
    filename = f"{NAME}-{VERSION}-py3-none-any.whl"
    digest = hashlib.sha256(data).hexdigest()
    os.makedirs(os.path.join(out, "files"), exist_ok=True)
    os.makedirs(os.path.join(out, "simple", NAME), exist_ok=True)
    with open(os.path.join(out, "files", filename), "wb") as f:
        f.write(data)
    with open(os.path.join(out, "simple", NAME, "index.html"), "w") as f:
        f.write(f'<html><body><a href="/files/{filename}#sha256={digest}">{filename}</a></body></html>\n')
    print(NAME, digest)


if __name__ == "__main__":
    main()
